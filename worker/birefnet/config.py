"""Configuration for the BiRefNet model: a frozen dataclass filled in from a backbone preset."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, TypeVar

PatchOrder = Literal["einops", "legacy"]

_Field = TypeVar("_Field")


def filled(value: _Field | None) -> _Field:
    """A config field that ``__post_init__`` has filled in from the preset (never None after it)."""
    if value is None:
        raise ValueError("BiRefNetConfig field read before the preset filled it in")
    return value


# The official decoder widths; every preset but nano uses them.
_DECODER = {
    "dec_inter_channels": 64,
    "aspp_channels": 256,
    "ipt_inter_channels": 64,
    "gdt_channels": 16,
    "aspp_kernel_sizes": (1, 3, 7),
}

# Per-preset values for the fields left as None.
_PRESETS: dict[str, dict] = {
    "swin_v1_t": {
        "embed_dim": 96,
        "depths": (2, 2, 6, 2),
        "num_heads": (3, 6, 12, 24),
        "window_size": 7,
        **_DECODER,
    },
    "swin_v1_s": {
        "embed_dim": 96,
        "depths": (2, 2, 18, 2),
        "num_heads": (3, 6, 12, 24),
        "window_size": 7,
        **_DECODER,
    },
    "swin_v1_b": {
        "embed_dim": 128,
        "depths": (2, 2, 18, 2),
        "num_heads": (4, 8, 16, 32),
        "window_size": 12,
        **_DECODER,
    },
    "swin_v1_l": {
        "embed_dim": 192,
        "depths": (2, 2, 18, 2),
        "num_heads": (6, 12, 24, 48),
        "window_size": 12,
        **_DECODER,
    },
    # Tiny, untrained architecture for fast CPU tests and benchmarks: NO published checkpoint
    # exists (use `recipe_state_dict` or random init). Same structure and code paths as the
    # real presets, with narrow widths and 3x3 (not 7x7) largest deformable branch.
    "swin_v1_nano": {
        "embed_dim": 32,
        "depths": (1, 1, 1, 1),
        "num_heads": (1, 2, 4, 8),
        "window_size": 7,
        "dec_inter_channels": 16,
        "aspp_channels": 32,
        "ipt_inter_channels": 16,
        "gdt_channels": 8,
        "aspp_kernel_sizes": (1, 3, 3),
    },
}

PRESETS: tuple[str, ...] = tuple(_PRESETS)


@dataclass(frozen=True)
class BiRefNetConfig:
    """BiRefNet architecture; fields left as ``None`` are filled in from the backbone preset.

    ``swin_v1_t`` / ``swin_v1_l`` are checked against the official model, ``swin_v1_s`` / ``swin_v1_b``
    are the standard Swin sizes; ``swin_v1_nano`` has NO published checkpoint (fast tests and benchmarks:
    a fused 1024x1024 forward takes ~0.5 s on 2 cores). ``patch_order``: see `decoder.patch_stack`.
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
    # Decoder widths (None -> preset value; the official ones except for nano).
    dec_inter_channels: int | None = None  # BasicDecBlk conv_in output ("fixed" dec_channels_inter)
    aspp_channels: int | None = None  # ASPPDeformable per-branch width
    ipt_inter_channels: int | None = None  # SimpleConvs hidden width of the image-patch blocks
    gdt_channels: int | None = None  # gradient-attention branch width
    aspp_kernel_sizes: tuple[int, ...] | None = None  # deformable branch kernels, official (1, 3, 7)
    num_context: int = 3  # how many shallower stages are concatenated onto the deepest one

    def __post_init__(self) -> None:
        if self.backbone not in _PRESETS:
            raise ValueError(f"unknown backbone {self.backbone!r}; expected one of {PRESETS}")
        if self.patch_order not in ("einops", "legacy"):
            raise ValueError(f"patch_order must be 'einops' or 'legacy', got {self.patch_order!r}")
        for name, value in _PRESETS[self.backbone].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        object.__setattr__(self, "depths", tuple(filled(self.depths)))
        object.__setattr__(self, "aspp_kernel_sizes", tuple(filled(self.aspp_kernel_sizes)))
        object.__setattr__(self, "num_heads", tuple(filled(self.num_heads)))
        if len(filled(self.depths)) != 4 or len(filled(self.num_heads)) != 4:
            raise ValueError("BiRefNet expects a 4-stage backbone")
        if not 0 <= self.num_context <= 3:
            raise ValueError("num_context must be in [0, 3]")

    @property
    def stage_dims(self) -> tuple[int, ...]:
        """Channels of each backbone stage output (strides 4, 8, 16, 32)."""
        return tuple(filled(self.embed_dim) * 2**i for i in range(4))

    @property
    def lateral_channels(self) -> tuple[int, ...]:
        """Channels fed to the decoder, deepest first; doubled by the two-scale encoder concat."""
        return tuple(2 * c for c in reversed(self.stage_dims))

    @property
    def context_channels(self) -> int:
        """Extra channels concatenated onto the deepest feature before the squeeze block."""
        return sum(self.lateral_channels[1 : 1 + self.num_context])
