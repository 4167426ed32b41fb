"""BiRefNet (Zheng et al., "Bilateral Reference for High-Resolution Dichotomous Image Segmentation").

Inference-only re-implementation that loads the official checkpoints (``strict=True``, official
key names) and reproduces the official logits. Pipeline:

1. Swin v1 encoder run twice, on the image and on the image resized to half size; each stage's
   half-size output is resized back and concatenated after the full-size one (channels x2).
2. The three shallower stages are resized to the deepest one and concatenated before it, then
   squeezed by a BasicDecBlk (conv -> ASPPDeformable -> conv).
3. Decoder, deepest first: each stage concatenates an embedding of an image "patch stack" (the
   image cut into tiles the size of the feature map), runs a BasicDecBlk, gates the result by a
   gradient-attention map, upsamples and adds the lateral (1x1 conv) encoder feature.

Every resize is bilinear with ``align_corners=True``. ``forward`` returns the final logits
(N, 1, H, W); H and W should be multiples of 32.

``fuse_for_inference()`` (CPU, float32) switches to a faster path with the same math up to
float32 rounding (max |diff| vs the official logits ~3e-6, like the reference path):

* GEMMs on oneDNN with prepacked weights and fused bias / GELU / ReLU / residual add;
* BatchNorm folded into the convs; offset and modulator convs merged into one;
* a vectorised deformable conv (`deform.py`) instead of torchvision's scalar CPU kernel, with
  the ASPP branches and their 1x1 fusion conv computed chunk by chunk;
* linear maps composed where they commute: the final 1x1 conv moved before the last resize and
  folded into the 3x3 convs feeding it, the full-size image branch reduced to one 5x5 conv (plus
  an exact border fix), the lateral 1x1 convs split over the (full, half)-size encoder parts.

Other inputs (GPU, half precision) take the reference path, which matches the official code
op for op (and uses torchvision's ``deform_conv2d``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .blocks import BasicDecBlk
from .config import BiRefNetConfig, filled
from .decoder import Decoder, resize
from .ops import fast_path
from .swin import SwinTransformer


class BiRefNet(nn.Module):
    def __init__(self, config: BiRefNetConfig | None = None) -> None:
        super().__init__()
        cfg = config or BiRefNetConfig()
        self.config = cfg
        self.bb = SwinTransformer(
            embed_dim=filled(cfg.embed_dim),
            depths=filled(cfg.depths),
            num_heads=filled(cfg.num_heads),
            window_size=filled(cfg.window_size),
            mlp_ratio=cfg.mlp_ratio,
            patch_size=cfg.patch_size,
            in_chans=cfg.in_chans,
        )
        ch = cfg.lateral_channels
        self.squeeze_module = nn.Sequential(
            BasicDecBlk(
                ch[0] + cfg.context_channels,
                ch[0],
                filled(cfg.dec_inter_channels),
                filled(cfg.aspp_channels),
                filled(cfg.aspp_kernel_sizes),
            )
        )
        self.decoder = Decoder(cfg)
        self._fused = False
        # Fused copies of weights go stale when new weights are loaded: rebuild them.
        self.register_load_state_dict_post_hook(BiRefNet._refuse_after_load)

    # ------------------------------------------------------------------ encoder
    def encode(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        h, w = x.shape[-2:]
        # Contiguous NCHW stage outputs, as in the official code (mixed memory formats would send
        # later cats and convs down slow paths).
        full = [f.contiguous() for f in self.bb(x)]
        half = [f.contiguous() for f in self.bb(resize(x, (h // 2, w // 2)))]
        x1, x2, x3, x4 = (
            torch.cat([f, resize(g, f.shape[-2:])], dim=1) for f, g in zip(full, half, strict=True)
        )
        n = self.config.num_context
        if n:
            context = [resize(f, x4.shape[-2:]) for f in (x1, x2, x3)[3 - n :]]
            x4 = torch.cat([*context, x4], dim=1)
        return x1, x2, x3, x4

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, 3, H, W) ImageNet-normalised, H and W multiples of 32 -> logits (N, 1, H, W)."""
        if x.dim() != 4 or x.shape[-1] % 32 or x.shape[-2] % 32:
            raise ValueError(f"expected (N, C, H, W) with H and W multiples of 32, got {tuple(x.shape)}")
        if fast_path(self._fused or None, x):
            return self._forward_fused(x)
        x1, x2, x3, x4 = self.encode(x)
        x4 = self.squeeze_module(x4)
        return self.decoder(x, x1, x2, x3, x4).contiguous()

    def _forward_fused(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        full = self.bb(x)
        half = self.bb(resize(x, (h // 2, w // 2)))
        # x4 input of the squeeze block: resized context stages, then the deepest stage; each
        # stage is cat(full, resize(half)), resized per part (resize is per-channel).
        size4 = full[3].shape[-2:]
        n = self.config.num_context
        parts = []
        for f, g in zip(full[3 - n : 3], half[3 - n : 3], strict=True):
            parts += [resize(f, size4), resize(resize(g, f.shape[-2:]), size4)]
        x4 = torch.cat([*parts, full[3], resize(half[3], size4)], dim=1)
        x4 = self.squeeze_module(x4)
        return self.decoder.forward_fused(x, full, half, x4).contiguous()

    # ------------------------------------------------------------------ fast path
    @property
    def _squeeze_block(self) -> BasicDecBlk:
        block = self.squeeze_module[0]  # nn.Sequential indexing is typed as any Module
        assert isinstance(block, BasicDecBlk)
        return block

    @torch.no_grad()
    def fuse_for_inference(self) -> BiRefNet:
        """Precompute inference-only fused weights (state_dict keys are unchanged).

        Call after loading weights; later `load_state_dict` calls refresh the fused copies."""
        self._squeeze_block.fuse()
        self.decoder.fuse()
        self.bb.fuse()
        self._fused = True
        return self

    def unfuse(self) -> BiRefNet:
        """Back to the reference path (drops the fused copies)."""
        self._squeeze_block.unfuse()
        self.decoder.unfuse()
        self.bb.unfuse()
        self._fused = False
        return self

    @property
    def is_fused(self) -> bool:
        return self._fused

    def train(self, mode: bool = True) -> BiRefNet:
        if mode and self._fused:
            self.unfuse()  # fused weights would not follow training updates
        return super().train(mode)

    @staticmethod
    def _refuse_after_load(module: nn.Module, _incompatible) -> None:
        if isinstance(module, BiRefNet) and module._fused:
            module.unfuse().fuse_for_inference()
