"""Decoder building blocks of BiRefNet: modulated deformable conv, ASPPDeformable, decoder/lateral blocks.

Each block has the reference ``forward`` (official structure, torchvision's ``deform_conv2d``) and,
after ``fuse()``, an inference path with BatchNorm folded into the convs (in float64, cast once):

* ASPPDeformable: the four deformable branches are sampled chunk by chunk of output pixels
  (see `deform.py`); each chunk goes through every branch's GEMM+BN+ReLU and then ``conv1``
  straight away, so the 4 x 256-channel full-size branch outputs are never materialised. The
  image-pooling branch is constant over space, so its share of ``conv1`` is a per-image bias.
* GEMMs use prepacked oneDNN weights with fused bias+ReLU (`ops.PackedLinear`).
* tensors stay channels-last (what oneDNN convolutions and the row GEMMs want).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import deform_conv2d

from .deform import CHUNK_PIXELS, deform_weight_matrix, padded_rows, sample_columns
from .ops import PackedLinear, fast_path, fused_state

CL = torch.channels_last


def bn_scale_shift(bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """Eval BatchNorm as y = x * scale + shift (float64)."""
    weight, bias, mean, var = bn.weight, bn.bias, bn.running_mean, bn.running_var
    if weight is None or bias is None or mean is None or var is None:
        raise ValueError("only an affine BatchNorm with running statistics folds into a conv")
    scale = weight.double() / torch.sqrt(var.double() + bn.eps)
    return scale, bias.double() - mean.double() * scale


def fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d | None) -> tuple[Tensor, Tensor]:
    """float64 (weight, bias) of ``bn(conv(x))``."""
    weight = conv.weight.detach().double()
    bias = conv.bias.detach().double() if conv.bias is not None else weight.new_zeros(weight.shape[0])
    if bn is not None:
        scale, shift = bn_scale_shift(bn)
        weight = weight * scale.view(-1, 1, 1, 1)
        bias = bias * scale + shift
    return weight, bias


def f32(*tensors: Tensor) -> tuple[Tensor, ...]:
    return tuple(t.detach().float().contiguous() for t in tensors)


def conv1x1(x: Tensor, linear: PackedLinear) -> Tensor:
    """1x1 conv as one GEMM over channels-last rows (PyTorch's own 1x1 conv path is slow here)."""
    b, c, h, w = x.shape
    out = linear(x.permute(0, 2, 3, 1).reshape(b, h * w, c))
    return out.view(b, h, w, -1).permute(0, 3, 1, 2)


class DeformableConv2d(nn.Module):
    """Modulated deformable conv (DCNv2): per-tap offsets and a 2*sigmoid modulator predicted from x."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, padding: int) -> None:
        super().__init__()
        k = kernel_size
        self.kernel_size = k
        self.padding = padding
        self.offset_conv = nn.Conv2d(in_channels, 2 * k * k, k, padding=padding)
        self.modulator_conv = nn.Conv2d(in_channels, k * k, k, padding=padding)
        self.regular_conv = nn.Conv2d(in_channels, out_channels, k, padding=padding, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        offset = self.offset_conv(x)
        modulator = 2.0 * torch.sigmoid(self.modulator_conv(x))
        if x.dtype == torch.bfloat16:
            # torchvision's deform_conv2d has no bfloat16 kernel (CUDA or CPU): this one op runs in float32.
            return deform_conv2d(
                x.float(),
                offset.float(),
                self.regular_conv.weight.float(),
                None,
                padding=self.padding,
                mask=modulator.float(),
            ).to(torch.bfloat16)
        return deform_conv2d(x, offset, self.regular_conv.weight, None, padding=self.padding, mask=modulator)


class ASPPBranch(nn.Module):
    """Deformable conv -> BN -> ReLU (one parallel branch of ASPPDeformable)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.atrous_conv = DeformableConv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.bn(self.atrous_conv(x)))

    def fused_params(self) -> tuple[Tensor, Tensor, PackedLinear]:
        """[offset; modulator] conv (weight, bias) and the BN-folded sampling GEMM (+ReLU)."""
        conv = self.atrous_conv
        om_w = torch.cat([conv.offset_conv.weight, conv.modulator_conv.weight])
        offset_bias, modulator_bias = conv.offset_conv.bias, conv.modulator_conv.bias
        assert offset_bias is not None and modulator_bias is not None  # both convs are built with bias
        om_b = torch.cat([offset_bias, modulator_bias])
        w, b = fold_bn(conv.regular_conv, self.bn)
        om_w, om_b, w_mat, b = f32(om_w, om_b, deform_weight_matrix(w), b)
        return om_w, om_b, PackedLinear(w_mat.t(), b, activation="relu", rows_hint=CHUNK_PIXELS)


class ASPPDeformable(nn.Module):
    """ASPP with deformable branches: 1x1, then one per kernel size (1, 3, 7), plus image pooling."""

    def __init__(self, in_channels: int, inter_channels: int, kernel_sizes: tuple[int, ...]) -> None:
        super().__init__()
        self.aspp1 = ASPPBranch(in_channels, inter_channels, 1)
        self.aspp_deforms = nn.ModuleList(ASPPBranch(in_channels, inter_channels, k) for k in kernel_sizes)
        self.global_avg_pool = nn.Sequential(
            nn.AdaptiveAvgPool2d((1, 1)),
            nn.Conv2d(in_channels, inter_channels, 1, bias=False),
            nn.BatchNorm2d(inter_channels),
            nn.ReLU(inplace=True),
        )
        self.conv1 = nn.Conv2d(inter_channels * (2 + len(kernel_sizes)), in_channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self._fused: dict | None = None

    @property
    def branches(self) -> tuple[ASPPBranch, ...]:
        return (self.aspp1, *self.aspp_deforms)

    def forward(self, x: Tensor) -> Tensor:
        if fast_path(self._fused, x):
            return self._forward_fused(x)
        feats = [blk(x) for blk in self.branches]
        pooled = self.global_avg_pool(x)
        pooled = F.interpolate(pooled, size=x.shape[2:], mode="bilinear", align_corners=True)
        out = self.conv1(torch.cat([*feats, pooled], dim=1))
        return self.relu(self.bn1(out))  # (+ dropout: identity at inference)

    def fuse(self) -> None:
        pool_conv, pool_bn = self.global_avg_pool[1], self.global_avg_pool[2]
        assert isinstance(pool_conv, nn.Conv2d) and isinstance(pool_bn, nn.BatchNorm2d)
        pool_w, pool_b = fold_bn(pool_conv, pool_bn)
        w1, b1 = fold_bn(self.conv1, self.bn1)
        w1 = w1.flatten(1)  # (Cout, 256 * n_branches + 256)
        n_spatial = self.aspp1.bn.num_features * len(self.branches)
        w1_spatial, w1_pool, b1 = f32(w1[:, :n_spatial], w1[:, n_spatial:], b1)
        self._fused = {
            "branches": [blk.fused_params() for blk in self.branches],
            # bias given per call: conv1's share of the pooled branch + its own (folded) bias
            "conv1": PackedLinear(w1_spatial, None, activation="relu", rows_hint=CHUNK_PIXELS),
            "pool": f32(pool_w.flatten(1), pool_b),
            "pool_conv1": (w1_pool, b1),
        }

    def unfuse(self) -> None:
        self._fused = None

    def _forward_fused(self, x: Tensor) -> Tensor:
        p = fused_state(self._fused)
        b_sz, c, h, w = x.shape
        rows = padded_rows(x)  # (B, (H+2)*(W+2), C), zero border
        tokens = x.permute(0, 2, 3, 1).reshape(b_sz, h * w, c)
        # Image pooling branch: constant over space, so it only adds a per-image bias to conv1.
        pooled = F.relu(F.linear(tokens.mean(1), *p["pool"]))
        image_bias = F.linear(pooled, *p["pool_conv1"])  # (B, Cout), includes conv1's own bias
        offsets, modulators = [], []
        for blk, (om_w, om_b, _) in zip(self.branches, p["branches"], strict=True):
            k, pad = blk.atrous_conv.kernel_size, blk.atrous_conv.padding
            if k == 1:
                om = F.linear(tokens, om_w.flatten(1), om_b).view(b_sz, h, w, 3)
            else:
                om = F.conv2d(x, om_w, om_b, padding=pad).permute(0, 2, 3, 1)  # (B, H, W, 3K)
            offsets.append(om[..., : 2 * k * k].reshape(b_sz, h, w, k * k, 2))
            modulators.append(torch.sigmoid(om[..., 2 * k * k :]).mul_(2.0))
        out = x.new_empty(b_sz, h * w, p["conv1"].out_features)
        for bi in range(b_sz):
            samplers = [
                sample_columns(
                    rows[bi], h, w, off[bi], mod[bi], blk.atrous_conv.kernel_size, blk.atrous_conv.padding
                )
                for blk, off, mod in zip(self.branches, offsets, modulators, strict=True)
            ]
            # Chunk by chunk: every branch's GEMM+BN+ReLU, then conv1+BN+ReLU over their concat.
            for chunks in zip(*samplers, strict=True):
                r0, r1 = chunks[0][:2]
                feats = [lin(cols) for (_, _, cols), (_, _, lin) in zip(chunks, p["branches"], strict=True)]
                out[bi, r0 * w : r1 * w] = p["conv1"](torch.cat(feats, dim=1), bias=image_bias[bi])
        return out.view(b_sz, h, w, -1).permute(0, 3, 1, 2)


class BasicDecBlk(nn.Module):
    """conv3x3 -> BN -> ReLU -> ASPPDeformable -> conv3x3 -> BN."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        inter_channels: int,
        aspp_channels: int,
        kernel_sizes: tuple[int, ...],
    ) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, inter_channels, 3, padding=1)
        self.relu_in = nn.ReLU(inplace=True)
        self.dec_att = ASPPDeformable(inter_channels, aspp_channels, kernel_sizes)
        self.conv_out = nn.Conv2d(inter_channels, out_channels, 3, padding=1)
        self.bn_in = nn.BatchNorm2d(inter_channels)
        self.bn_out = nn.BatchNorm2d(out_channels)
        self._fused: tuple[Tensor, ...] | None = None

    def forward(self, x: Tensor) -> Tensor:
        if fast_path(self._fused, x):
            w_out, b_out = fused_state(self._fused)[2:]
            return F.conv2d(self.forward_body(x), w_out, b_out, padding=1)
        x = self.relu_in(self.bn_in(self.conv_in(x)))
        return self.bn_out(self.conv_out(self.dec_att(x)))

    def forward_body(self, x: Tensor) -> Tensor:
        """Fused path up to (not including) conv_out: conv_in+BN+ReLU, ASPP."""
        w_in, b_in = fused_state(self._fused)[:2]
        x = F.conv2d(x.contiguous(memory_format=CL), w_in, b_in, padding=1).relu_()
        return self.dec_att(x)

    def folded_conv_out(self) -> tuple[Tensor, Tensor]:
        """float64 (weight, bias) of bn_out(conv_out(.)), for composing with a following 1x1 conv."""
        return fold_bn(self.conv_out, self.bn_out)

    def fuse(self) -> None:
        self.dec_att.fuse()
        self._fused = f32(*fold_bn(self.conv_in, self.bn_in), *fold_bn(self.conv_out, self.bn_out))

    def unfuse(self) -> None:
        self.dec_att.unfuse()
        self._fused = None


class SimpleConvs(nn.Module):
    """Two 3x3 convs without activation: embeds an image patch stack for a decoder stage."""

    def __init__(self, in_channels: int, out_channels: int, inter_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, inter_channels, 3, padding=1)
        self.conv_out = nn.Conv2d(inter_channels, out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_out(self.conv1(x))


class BasicLatBlk(nn.Module):
    """1x1 lateral conv from an encoder stage into the decoder."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)
