"""Configuration for the BiRefNet model: a frozen dataclass filled in from a backbone preset."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

PatchOrder = Literal["einops", "legacy"]

# Swin v1 hyper-parameters: (embed_dim, depths, num_heads, window_size).
_SWIN_PRESETS: dict[str, tuple[int, tuple[int, ...], tuple[int, ...], int]] = {
    "swin_v1_t": (96, (2, 2, 6, 2), (3, 6, 12, 24), 7),
    "swin_v1_s": (96, (2, 2, 18, 2), (3, 6, 12, 24), 7),
    "swin_v1_b": (128, (2, 2, 18, 2), (4, 8, 16, 32), 12),
    "swin_v1_l": (192, (2, 2, 18, 2), (6, 12, 24, 48), 12),
    # Tiny, untrained architecture for fast CPU tests and benchmarks. There is NO published
    # checkpoint for it; use `recipe_state_dict` (or random init) to get weights.
    "swin_v1_nano": (32, (1, 1, 1, 1), (1, 2, 4, 8), 7),
}

_PRESET_FIELDS = ("embed_dim", "depths", "num_heads", "window_size")
PRESETS: tuple[str, ...] = tuple(_SWIN_PRESETS)


@dataclass(frozen=True)
class BiRefNetConfig:
    """BiRefNet architecture, derived from a backbone preset.

    Presets: ``swin_v1_t`` / ``swin_v1_l`` (checked against the official model),
    ``swin_v1_s`` / ``swin_v1_b`` (standard Swin sizes), and ``swin_v1_nano``: a tiny
    untrained architecture with no published checkpoint, meant for fast tests.

    ``patch_order`` selects how the decoder stacks image tiles on the channel axis:
    ``"einops"`` (official code since Nov 2024, channel ``c*GH*GW + row*GW + col``) or
    ``"legacy"`` (older code and third-party ports, channel ``(col*GH + row)*3 + c``).

    Backbone fields left as ``None`` are filled in from the preset.
    """

    backbone: str = "swin_v1_l"
    patch_order: PatchOrder = "einops"
    # Swin backbone (None -> preset value).
    embed_dim: int | None = None
    depths: tuple[int, ...] | None = None
    num_heads: tuple[int, ...] | None = None
    window_size: int | None = None
    mlp_ratio: float = 4.0
    patch_size: int = 4
    in_chans: int = 3
    # Decoder widths (the official defaults).
    dec_inter_channels: int = 64  # BasicDecBlk conv_in output ("fixed" dec_channels_inter)
    aspp_channels: int = 256  # ASPPDeformable per-branch width
    aspp_kernel_sizes: tuple[int, ...] = (1, 3, 7)
    ipt_inter_channels: int = 64  # SimpleConvs hidden width of the image-patch blocks
    gdt_channels: int = 16  # gradient-attention branch width
    num_context: int = 3  # how many shallower stages are concatenated onto the deepest one

    def __post_init__(self) -> None:
        if self.backbone not in _SWIN_PRESETS:
            raise ValueError(f"unknown backbone {self.backbone!r}; expected one of {PRESETS}")
        if self.patch_order not in ("einops", "legacy"):
            raise ValueError(f"patch_order must be 'einops' or 'legacy', got {self.patch_order!r}")
        preset = dict(zip(_PRESET_FIELDS, _SWIN_PRESETS[self.backbone], strict=True))
        for name, value in preset.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        object.__setattr__(self, "depths", tuple(self.depths))
        object.__setattr__(self, "num_heads", tuple(self.num_heads))
        if len(self.depths) != 4 or len(self.num_heads) != 4:
            raise ValueError("BiRefNet expects a 4-stage backbone")
        if not 0 <= self.num_context <= 3:
            raise ValueError("num_context must be in [0, 3]")

    @property
    def stage_dims(self) -> tuple[int, ...]:
        """Channels of each backbone stage output (strides 4, 8, 16, 32)."""
        return tuple(self.embed_dim * 2**i for i in range(4))

    @property
    def lateral_channels(self) -> tuple[int, ...]:
        """Channels fed to the decoder, deepest first; doubled by the two-scale encoder concat."""
        return tuple(2 * c for c in reversed(self.stage_dims))

    @property
    def context_channels(self) -> int:
        """Extra channels concatenated onto the deepest feature before the squeeze block."""
        return sum(self.lateral_channels[1 : 1 + self.num_context])
