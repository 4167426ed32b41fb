"""Swin Transformer v1 backbone, as used by BiRefNet (inference only).

Follows the detection/segmentation flavour of Swin (Liu et al., 2021): a 4x4 patch embedding,
four stages of (shifted) window attention with relative position bias, patch merging between
stages and a LayerNorm on every stage output. Behaviour that matters for matching the official
checkpoints numerically:

* windows are never shrunk for small feature maps; each block zero-pads the *normalised*
  tokens at the bottom/right to a multiple of the window size and the padded tokens take part
  in attention (no padding mask);
* the shifted-window mask is built on the padded grid (-inf between different regions).

Tokens are kept as ``(B, H, W, C)`` tensors. Windowing (roll + pad + partition) is a single
``index_select`` with a cached index, and the qkv / output projections run on the real tokens
only: a padded token is all-zero after the norm, so its qkv is exactly the qkv bias, written
into the padded window slots. ``fuse()`` switches the GEMMs to prepacked oneDNN kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ops import PackedLinear, fast_path, fused_state


def relative_position_index(window_size: int) -> Tensor:
    """Pairwise index into the (2w-1)^2 relative-position bias table, shape (w*w, w*w), int64."""
    coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij"))
    coords = coords.flatten(1)  # 2, N
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # N, N, 2 (dy, dx)
    rel = rel + (window_size - 1)
    return rel[..., 0] * (2 * window_size - 1) + rel[..., 1]


class WindowPlan:
    """Precomputed token <-> window mapping for one (H, W, window, shift) configuration.

    ``gather`` maps window slots to token rows; ``pad_slots`` are the slots of padding tokens.
    Windows whose shift mask is all-zero come first (``num_plain`` of them); the rest need the
    region mask in ``mask`` (num_masked, N, N) with 0 / -inf entries.
    """

    def __init__(self, height: int, width: int, window: int, shift: int, device: torch.device) -> None:
        hp = -(-height // window) * window
        wp = -(-width // window) * window
        n_wh, n_ww = hp // window, wp // window
        # Coordinates of every slot of every window on the rolled, padded grid: (nWh, nWw, w, w).
        rows = torch.arange(hp).view(n_wh, 1, window, 1).expand(n_wh, n_ww, window, window)
        cols = torch.arange(wp).view(1, n_ww, 1, window).expand(n_wh, n_ww, window, window)
        # torch.roll(x, -shift) means rolled[r] = x[(r + shift) % hp].
        src_r = (rows + shift) % hp
        src_c = (cols + shift) % wp
        real = (src_r < height) & (src_c < width)
        # Padded slots read token 0 and are then overwritten with the qkv bias (see SwinBlock).
        gather = torch.where(real, src_r * width + src_c, torch.zeros_like(src_r))
        gather = gather.reshape(n_wh * n_ww, window * window)
        real = real.reshape(n_wh * n_ww, window * window)

        if shift > 0:
            # Region labels of the shifted grid (3 bands per axis), compared pairwise per window.
            def bands(n: int) -> Tensor:
                lab = torch.zeros(n, dtype=torch.long)
                lab[n - window : n - shift] = 1
                lab[n - shift :] = 2
                return lab

            label = bands(hp)[rows] * 3 + bands(wp)[cols]
            label = label.reshape(n_wh * n_ww, window * window)
            blocked = label[:, :, None] != label[:, None, :]  # nW, N, N
            needs_mask = blocked.flatten(1).any(1)
        else:
            blocked = None
            needs_mask = torch.zeros(n_wh * n_ww, dtype=torch.bool)

        order = torch.cat([torch.nonzero(~needs_mask).flatten(), torch.nonzero(needs_mask).flatten()])
        gather, real = gather[order].flatten(), real[order].flatten()
        self.num_windows = n_wh * n_ww
        self.num_plain = int((~needs_mask).sum())
        self.mask: Tensor | None = None
        if blocked is not None and self.num_plain < self.num_windows:
            masked = blocked[order[self.num_plain :]]
            self.mask = torch.zeros(masked.shape).masked_fill_(masked, float("-inf")).to(device)
        self.gather = gather.to(device)
        pad_slots = torch.nonzero(~real).flatten()
        self.pad_slots = pad_slots.to(device) if pad_slots.numel() else None
        # Inverse map: for each real token, its slot in the window-major layout.
        slots = torch.arange(gather.numel())
        scatter = torch.empty(height * width, dtype=torch.long)
        scatter[gather[real]] = slots[real]
        self.scatter = scatter.to(device)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, with a learned relative position bias."""

    relative_position_index: Tensor  # a registered buffer

    def __init__(self, dim: int, window_size: int, num_heads: int) -> None:
        super().__init__()
        self.dim = dim
        self.window_size = window_size
        self.num_heads = num_heads
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window_size), persistent=True)
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self._bias_cache: Tensor | None = None  # set by `freeze_bias` for inference

    def position_bias(self) -> Tensor:
        """(heads, N, N) additive bias from the table."""
        table = self.relative_position_bias_table
        if self._bias_cache is not None and self._bias_cache.device == table.device:
            return self._bias_cache
        n = self.window_size**2
        bias = table[self.relative_position_index.view(-1)]
        return bias.view(n, n, self.num_heads).permute(2, 0, 1).contiguous()

    def freeze_bias(self) -> None:
        """Cache the gathered bias (weights must not change afterwards)."""
        self._bias_cache = None
        self._bias_cache = self.position_bias().detach()

    def unfreeze_bias(self) -> None:
        self._bias_cache = None

    def attend(self, qkv_windows: Tensor, plan: WindowPlan) -> Tensor:
        """qkv_windows: (B, nW, N, 3C) in plan order -> attention output (B, nW, N, C), pre-projection."""
        b, n_win, n, _ = qkv_windows.shape
        head_dim = self.dim // self.num_heads
        heads = qkv_windows.view(b, n_win, n, 3, self.num_heads, head_dim)
        q, k, v = heads.permute(3, 0, 1, 4, 2, 5).unbind(0)
        bias_HNN = self.position_bias().to(q.dtype)
        outs = []
        split = plan.num_plain
        if split > 0:
            outs.append(self._sdpa(q[:, :split], k[:, :split], v[:, :split], bias_HNN))
        if split < n_win:
            assert plan.mask is not None  # WindowPlan builds a mask whenever some windows need one
            # Windows crossing the shift-region boundaries: bias + region mask.
            mask_WHNN = bias_HNN.unsqueeze(0) + plan.mask.to(q.dtype).unsqueeze(1)
            outs.append(self._sdpa(q[:, split:], k[:, split:], v[:, split:], mask_WHNN))
        # (B, nW, heads, N, d) -> (B, nW, N, heads, d): the cat does the transpose in its one copy.
        outs = [o.transpose(2, 3) for o in outs]
        out = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]
        return out.reshape(b, n_win, n, self.dim)

    @staticmethod
    def _sdpa(q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
        b, w, h, n, d = q.shape
        # A 4-D mask keeps SDPA on the fused CPU kernel; a 3-D one falls back to the slow math path.
        mask = bias.unsqueeze(0) if bias.dim() == 3 else bias.repeat(b, 1, 1, 1)
        out = F.scaled_dot_product_attention(
            q.reshape(b * w, h, n, d), k.reshape(b * w, h, n, d), v.reshape(b * w, h, n, d), attn_mask=mask
        )
        return out.view(b, w, h, n, d)


class SwinBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, window_size: int, shift_size: int, mlp_ratio: float) -> None:
        super().__init__()
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self._fast: dict[str, PackedLinear] | None = None

    def fuse(self) -> None:
        """Prepacked oneDNN GEMMs with fused GELU / residual add (same fp32 math)."""
        self.attn.freeze_bias()
        self._fast = {
            "qkv": PackedLinear(self.attn.qkv.weight, self.attn.qkv.bias),
            "proj": PackedLinear(self.attn.proj.weight, self.attn.proj.bias),
            "fc1": PackedLinear(self.mlp.fc1.weight, self.mlp.fc1.bias, activation="gelu"),
            "fc2": PackedLinear(self.mlp.fc2.weight, self.mlp.fc2.bias),
        }

    def unfuse(self) -> None:
        self.attn.unfreeze_bias()
        self._fast = None

    def forward(self, tokens_BHWC: Tensor, plan: WindowPlan) -> Tensor:
        b, h, w, c = tokens_BHWC.shape
        attn = self.attn
        fast = self._fast if fast_path(self._fast, tokens_BHWC) else None
        x = self.norm1(tokens_BHWC)
        qkv_BLC = (fast["qkv"](x) if fast else attn.qkv(x)).view(b, h * w, 3 * c)
        # Windowing (pad + roll + partition) is one gather; qkv runs on real tokens only, since a
        # padded token is zero after the norm and its qkv is exactly the bias.
        windows = qkv_BLC.index_select(1, plan.gather)
        if plan.pad_slots is not None:
            windows[:, plan.pad_slots] = attn.qkv.bias.to(windows.dtype)
        out = attn.attend(windows.view(b, plan.num_windows, self.window_size**2, 3 * c), plan)
        out = out.view(b, -1, c).index_select(1, plan.scatter).view(b, h, w, c)
        if fast:
            tokens_BHWC = fast["proj"].add(out, tokens_BHWC)
            return fast["fc2"].add(fast["fc1"](self.norm2(tokens_BHWC)), tokens_BHWC)
        tokens_BHWC = tokens_BHWC + attn.proj(out)
        return tokens_BHWC + self.mlp(self.norm2(tokens_BHWC))


class PatchMerging(nn.Module):
    """2x2 neighbourhood -> one token: concat (4C) in the order (0,0), (1,0), (0,1), (1,1), LN, linear."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)
        self._fast: PackedLinear | None = None

    def forward(self, tokens_BHWC: Tensor) -> Tensor:
        b, h, w, c = tokens_BHWC.shape
        if h % 2 or w % 2:
            tokens_BHWC = F.pad(tokens_BHWC, (0, 0, 0, w % 2, 0, h % 2))
            h, w = h + h % 2, w + w % 2
        # (B, H/2, dy, W/2, dx, C) -> (B, H/2, W/2, dx, dy, C): row offset varies fastest.
        x = tokens_BHWC.view(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5)
        x = x.reshape(b, h // 2, w // 2, 4 * c)
        x = self.norm(x)
        return fused_state(self._fast)(x) if fast_path(self._fast, x) else self.reduction(x)

    def fuse(self) -> None:
        self._fast = PackedLinear(self.reduction.weight, None)

    def unfuse(self) -> None:
        self._fast = None


class SwinStage(nn.Module):
    def __init__(
        self, dim: int, depth: int, num_heads: int, window_size: int, mlp_ratio: float, downsample: bool
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, window_size, 0 if i % 2 == 0 else window_size // 2, mlp_ratio)
            for i in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None
        self._plans: dict[tuple, WindowPlan] = {}

    def plan(self, height: int, width: int, shift: int, device: torch.device) -> WindowPlan:
        key = (height, width, shift, device)
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) > 16:  # many input sizes: keep the cache bounded
                self._plans.clear()
            plan = self._plans[key] = WindowPlan(height, width, self.window_size, shift, device)
        return plan

    def forward(self, tokens_BHWC: Tensor) -> Tensor:
        _, h, w, _ = tokens_BHWC.shape
        for blk in self.blocks:
            assert isinstance(blk, SwinBlock)  # nn.ModuleList iterates as plain Modules
            tokens_BHWC = blk(tokens_BHWC, self.plan(h, w, blk.shift_size, tokens_BHWC.device))
        return tokens_BHWC


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x_BCHW: Tensor) -> Tensor:
        p = self.patch_size
        h, w = x_BCHW.shape[-2:]
        if h % p or w % p:
            x_BCHW = F.pad(x_BCHW, (0, (p - w % p) % p, 0, (p - h % p) % p))
        return self.norm(self.proj(x_BCHW).permute(0, 2, 3, 1))


class SwinTransformer(nn.Module):
    """Swin v1 feature extractor: returns 4 maps (B, C_i, H/2^(i+2), W/2^(i+2)), C_i = embed_dim * 2^i."""

    def __init__(
        self,
        embed_dim: int,
        depths: tuple[int, ...],
        num_heads: tuple[int, ...],
        window_size: int,
        mlp_ratio: float = 4.0,
        patch_size: int = 4,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.num_features = [embed_dim * 2**i for i in range(len(depths))]
        last = len(depths) - 1
        self.layers = nn.ModuleList(
            SwinStage(self.num_features[i], depths[i], num_heads[i], window_size, mlp_ratio, i < last)
            for i in range(len(depths))
        )
        for i, dim in enumerate(self.num_features):
            self.add_module(f"norm{i}", nn.LayerNorm(dim))

    def fuse(self) -> None:
        for m in self.modules():
            if isinstance(m, SwinBlock | PatchMerging):
                m.fuse()

    def unfuse(self) -> None:
        for m in self.modules():
            if isinstance(m, SwinBlock | PatchMerging):
                m.unfuse()

    def forward(self, x_BCHW: Tensor) -> list[Tensor]:
        tokens_BHWC = self.patch_embed(x_BCHW)
        feats = []
        for i, stage in enumerate(self.layers):
            assert isinstance(stage, SwinStage)  # nn.ModuleList iterates as plain Modules
            tokens_BHWC = stage(tokens_BHWC)
            # NCHW view of channels-last memory: the decoder convs prefer it anyway.
            feats.append(getattr(self, f"norm{i}")(tokens_BHWC).permute(0, 3, 1, 2))
            if stage.downsample is not None:
                tokens_BHWC = stage.downsample(tokens_BHWC)
        return feats
