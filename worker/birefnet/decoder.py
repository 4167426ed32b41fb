"""BiRefNet decoder: coarse-to-fine blocks with lateral connections, image-patch references
(the "inward" bilateral reference) and gradient-attention gating (the "outward" reference)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .blocks import CL, BasicDecBlk, BasicLatBlk, SimpleConvs, conv1x1, f32, fold_bn
from .config import BiRefNetConfig, filled
from .ops import PackedLinear, fast_path, fused_state


def resize(x: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """Bilinear, align_corners=True: the resize used everywhere in BiRefNet."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x  # align_corners=True at equal size is an exact copy
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


def patch_stack(
    image_BCHW: Tensor, grid_h: int, grid_w: int, order: str, channels_last: bool = False
) -> Tensor:
    """Cut the image into grid_h x grid_w tiles and stack them on the channel axis.

    einops: channel = c * GH * GW + row * GW + col   (official code since Nov 2024)
    legacy: channel = (col * GH + row) * C + c         (older code, third-party ports)

    One copy, into contiguous or channels-last memory.
    """
    b, c, h, w = image_BCHW.shape
    th, tw = h // grid_h, w // grid_w
    tiles = image_BCHW.reshape(b, c, grid_h, th, grid_w, tw)  # (B, C, row, th, col, tw)
    if channels_last:  # (B, th, tw, channel...) with the channel sub-axes ordered as above
        tiles = tiles.permute(0, 3, 5, 1, 2, 4) if order == "einops" else tiles.permute(0, 3, 5, 4, 2, 1)
        return tiles.reshape(b, th, tw, c * grid_h * grid_w).permute(0, 3, 1, 2)
    tiles = tiles.permute(0, 1, 2, 4, 3, 5) if order == "einops" else tiles.permute(0, 4, 2, 1, 3, 5)
    return tiles.reshape(b, c * grid_h * grid_w, th, tw)


class Decoder(nn.Module):
    def __init__(self, cfg: BiRefNetConfig) -> None:
        super().__init__()
        self.patch_order = cfg.patch_order
        ch = cfg.lateral_channels  # deepest first, e.g. Swin-T: (1536, 768, 384, 192)
        ic = filled(cfg.ipt_inter_channels)
        ipt_out = [c // 8 for c in ch]
        # Patch-stack inputs: 32x32, 16x16, 8x8, 4x4 and 1x1 tiles of the RGB image.
        ipt_in = [g * g * cfg.in_chans for g in (32, 16, 8, 4, 1)]
        self.ipt_blk5 = SimpleConvs(ipt_in[0], ipt_out[0], ic)
        self.ipt_blk4 = SimpleConvs(ipt_in[1], ipt_out[0], ic)
        self.ipt_blk3 = SimpleConvs(ipt_in[2], ipt_out[1], ic)
        self.ipt_blk2 = SimpleConvs(ipt_in[3], ipt_out[2], ic)
        self.ipt_blk1 = SimpleConvs(ipt_in[4], ipt_out[3], ic)

        def dec_blk(cin: int, cout: int) -> BasicDecBlk:
            return BasicDecBlk(
                cin,
                cout,
                filled(cfg.dec_inter_channels),
                filled(cfg.aspp_channels),
                filled(cfg.aspp_kernel_sizes),
            )

        self.decoder_block4 = dec_blk(ch[0] + ipt_out[0], ch[1])
        self.decoder_block3 = dec_blk(ch[1] + ipt_out[0], ch[2])
        self.decoder_block2 = dec_blk(ch[2] + ipt_out[1], ch[3])
        self.decoder_block1 = dec_blk(ch[3] + ipt_out[2], ch[3] // 2)
        self.conv_out1 = nn.Sequential(nn.Conv2d(ch[3] // 2 + ipt_out[3], 1, 1))

        self.lateral_block4 = BasicLatBlk(ch[1], ch[1])
        self.lateral_block3 = BasicLatBlk(ch[2], ch[2])
        self.lateral_block2 = BasicLatBlk(ch[3], ch[3])

        # Training-only multi-scale supervision heads (kept for strict loading, never run).
        self.conv_ms_spvn_4 = nn.Conv2d(ch[1], 1, 1)
        self.conv_ms_spvn_3 = nn.Conv2d(ch[2], 1, 1)
        self.conv_ms_spvn_2 = nn.Conv2d(ch[3], 1, 1)

        # Gradient attention: conv -> BN -> ReLU -> 1x1 -> sigmoid gates each decoder stage.
        n = filled(cfg.gdt_channels)
        for i, cin in zip((4, 3, 2), ch[1:], strict=True):
            gdt = nn.Sequential(nn.Conv2d(cin, n, 3, padding=1), nn.BatchNorm2d(n), nn.ReLU(inplace=True))
            self.add_module(f"gdt_convs_{i}", gdt)
        for i in (4, 3, 2):  # training-only gradient prediction heads
            self.add_module(f"gdt_convs_pred_{i}", nn.Sequential(nn.Conv2d(n, 1, 1)))
        for i in (4, 3, 2):
            self.add_module(f"gdt_convs_attn_{i}", nn.Sequential(nn.Conv2d(n, 1, 1)))
        self._fused: dict | None = None

    @property
    def dec_blocks(self) -> tuple[BasicDecBlk, ...]:
        return (self.decoder_block4, self.decoder_block3, self.decoder_block2, self.decoder_block1)

    def _patches(self, image: Tensor, blk: SimpleConvs, size: torch.Size) -> Tensor:
        grid_h, grid_w = image.shape[-2] // size[0], image.shape[-1] // size[1]
        channels_last = fast_path(self._fused, image)
        stack = patch_stack(image, grid_h, grid_w, self.patch_order, channels_last=channels_last)
        return blk(resize(stack, size))

    def _gate(self, p: Tensor, i: int) -> Tensor:
        """p * sigmoid(attn(ReLU(BN(conv(p))))): gradient-aware attention."""
        attn = getattr(self, f"gdt_convs_attn_{i}")
        if not fast_path(self._fused, p):
            return p * torch.sigmoid(attn(getattr(self, f"gdt_convs_{i}")(p)))
        w, b, attn_1x1 = fused_state(self._fused)["gdt"][i]
        g = F.conv2d(p, w, b, padding=1).relu_()
        return p * torch.sigmoid(conv1x1(g, attn_1x1))

    def _stages(self, image: Tensor, x4: Tensor, laterals: list[Callable[[], Tensor]]) -> Tensor:
        """Decoder blocks 4, 3 and 2 (each gated), up to decoder block 1's input. `laterals` make the
        lateral terms added before blocks 3, 2 and 1, when they are needed."""
        p = torch.cat([x4, self._patches(image, self.ipt_blk5, x4.shape[-2:])], dim=1)
        p = self._gate(self.decoder_block4(p), 4)
        patch_blocks = (self.ipt_blk4, self.ipt_blk3, self.ipt_blk2)
        for i, (lateral, ipt) in enumerate(zip(laterals, patch_blocks, strict=True)):
            term = lateral()
            p = resize(p, term.shape[-2:]) + term
            p = torch.cat([p, self._patches(image, ipt, p.shape[-2:])], dim=1)
            if i < 2:
                p = self._gate(self.dec_blocks[i + 1](p), 3 - i)
        return p

    # ------------------------------------------------------------------ reference path
    def forward(self, image: Tensor, x1: Tensor, x2: Tensor, x3: Tensor, x4: Tensor) -> Tensor:
        p1 = self._stages(
            image,
            x4,
            [
                lambda: self.lateral_block4(x3),
                lambda: self.lateral_block3(x2),
                lambda: self.lateral_block2(x1),
            ],
        )
        p1 = resize(self.decoder_block1(p1), image.shape[-2:])
        p1 = torch.cat([p1, self._patches(image, self.ipt_blk1, p1.shape[-2:])], dim=1)
        return self.conv_out1(p1)

    # ------------------------------------------------------------------ fused path
    @torch.no_grad()
    def fuse(self) -> None:
        for blk in self.dec_blocks:
            blk.fuse()
        gdt = {}
        for i in (4, 3, 2):
            seq, attn = getattr(self, f"gdt_convs_{i}"), getattr(self, f"gdt_convs_attn_{i}")[0]
            gdt[i] = (*f32(*fold_bn(seq[0], seq[1])), PackedLinear(attn.weight.flatten(1), attn.bias))
        # The final 1x1 conv_out1 is linear and so commutes with the (weights-sum-to-1) bilinear
        # resize; compose it into the preceding 3x3 convs: decoder_block1.conv_out (+BN) and
        # ipt_blk1.conv_out, so neither 3x3 conv produces more than one channel.
        conv_out1 = self.conv_out1[0]
        assert isinstance(conv_out1, nn.Conv2d) and conv_out1.bias is not None
        w_out = conv_out1.weight.detach().double().flatten()  # (ca + cb,)
        b_out = conv_out1.bias.detach().double()
        ca = self.decoder_block1.conv_out.out_channels
        w_a, b_a = self.decoder_block1.folded_conv_out()
        w_b, b_b = fold_bn(self.ipt_blk1.conv_out, None)
        final_a = torch.einsum("o,oikl->ikl", w_out[:ca], w_a)[None], (w_out[:ca] @ b_a)[None]
        final_b = torch.einsum("o,oikl->ikl", w_out[ca:], w_b)[None], (w_out[ca:] @ b_b + b_out)
        # ... and at full size, ipt_blk1.conv1 (3->64, 3x3) followed by that 64->1 3x3 conv is one
        # 3->1 5x5 conv away from the image border (where the zero padding of the 64-channel
        # intermediate differs); the 1-pixel border is recomputed exactly by `_full_size_branch`.
        w1, b1 = fold_bn(self.ipt_blk1.conv1, None)
        w5 = w1.new_zeros(1, w1.shape[1], 5, 5)
        for dy in range(3):
            for dx in range(3):
                w5[0, :, dy : dy + 3, dx : dx + 3] += torch.einsum(
                    "o,oikl->ikl", final_b[0][0, :, dy, dx], w1
                )
        b5 = final_b[1] + (final_b[0].sum((2, 3)) @ b1)
        lateral = {}
        for name in ("lateral_block4", "lateral_block3", "lateral_block2"):
            conv = getattr(self, name).conv
            w, b = fold_bn(conv, None)
            c = w.shape[1] // 2  # input = cat(full-size part, half-size part)
            w_full, b, w_half = f32(w[:, :c].flatten(1), b, w[:, c:].flatten(1))
            lateral[name] = (PackedLinear(w_full, b), PackedLinear(w_half, None))
        self._fused = {
            "gdt": gdt,
            "lateral": lateral,
            "final_a": f32(*final_a),
            "final_b": f32(*final_b),
            "final_b5": f32(w5, b5),
        }

    def unfuse(self) -> None:
        self._fused = None
        for blk in self.dec_blocks:
            blk.unfuse()

    def forward_fused(self, image: Tensor, full: list[Tensor], half: list[Tensor], x4: Tensor) -> Tensor:
        """Same result as `forward`, with x1..x3 given as their (full-size, half-size) parts.

        lateral(cat(f, resize(h))) = W_f f + resize(W_h h) + b: the half-size part of each lateral
        1x1 conv runs at half size and the concatenated x1..x3 are never built."""
        p1 = self._stages(
            image,
            x4,
            [
                lambda: self._lateral("lateral_block4", full[2], half[2]),
                lambda: self._lateral("lateral_block3", full[1], half[1]),
                lambda: self._lateral("lateral_block2", full[0], half[0]),
            ],
        )
        body = self.decoder_block1.forward_body(p1)
        w_a, b_a = fused_state(self._fused)["final_a"]
        logits = resize(F.conv2d(body, w_a, b_a, padding=1), image.shape[-2:])
        return logits.add_(self._full_size_branch(image))

    def _full_size_branch(self, image: Tensor) -> Tensor:
        """conv_out1's share of ipt_blk1(image): conv3x3(3->64) then the composed conv3x3(64->1)."""
        conv1 = self.ipt_blk1.conv1
        fused = fused_state(self._fused)
        w_b, b_b = fused["final_b"]
        w_b5, b_b5 = fused["final_b5"]

        def two_step(x: Tensor) -> Tensor:
            return F.conv2d(conv1(x), w_b, b_b, padding=1)

        h, w = image.shape[-2:]
        x = image.contiguous(memory_format=CL)
        if min(h, w) < 4:
            return two_step(x)
        out = F.conv2d(x, w_b5, b_b5, padding=2)
        # Border pixels: exact two-step result on 3-pixel strips (rows/cols beyond are not needed).
        out[..., :1, :] = two_step(x[..., :3, :])[..., :1, :]
        out[..., -1:, :] = two_step(x[..., -3:, :])[..., -1:, :]
        out[..., :, :1] = two_step(x[..., :, :3])[..., :, :1]
        out[..., :, -1:] = two_step(x[..., :, -3:])[..., :, -1:]
        return out

    def _lateral(self, name: str, full: Tensor, half: Tensor) -> Tensor:
        lin_full, lin_half = fused_state(self._fused)["lateral"][name]
        return conv1x1(full, lin_full).add_(resize(conv1x1(half, lin_half), full.shape[-2:]))
