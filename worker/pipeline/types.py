"""The values the stages pass between them (worker.pipeline), and operating-resolution parsing."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from common.domain.errors import InvalidInputError

SIZE_MULTIPLE = 32  # Swin patch embedding (4) x three 2x patch merges
MAX_SIDE = 4096

ImageLike = Image.Image | np.ndarray  # a decoded RGB image: PIL, or (H, W, 3) uint8


def parse_resolution(text: str) -> tuple[int, int]:
    """'1024x1024' -> (width, height); both multiples of 32, at most 4096."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text or "")
    if not match:
        raise InvalidInputError(
            f"operating_resolution {text!r} is not WIDTHxHEIGHT", field="operating_resolution"
        )
    return check_resolution((int(match.group(1)), int(match.group(2))))


def check_resolution(resolution: tuple[int, int]) -> tuple[int, int]:
    width, height = resolution
    for side in (width, height):
        if side <= 0 or side % SIZE_MULTIPLE or side > MAX_SIDE:
            raise InvalidInputError(
                f"operating resolution {width}x{height}: each side must be a multiple of {SIZE_MULTIPLE} "
                f"between {SIZE_MULTIPLE} and {MAX_SIDE}",
                field="operating_resolution",
            )
    return width, height


@dataclass
class PreparedImage:
    """One image ready for the network: its input at the operating resolution, on the device.

    `device_rgb` (CUDA only) is the decoded image uploaded once, as (3, H, W) uint8, for the
    device-side refinement and composition."""

    network_input: torch.Tensor  # (3, h, w) float32, ImageNet-normalised
    size: tuple[int, int]  # (W, H) of the decoded image
    device_rgb: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)


@dataclass(eq=False)
class Mask:
    """A job's mask at the image's size, at 8-bit precision (what the output mask holds, what is kept and
    cached), so a mask read back from its PNG renders exactly the pixels of the first run.

    `device_levels` and `device_rgb` (CUDA, the network ran for this job): the same mask as float levels
    and the uploaded image, on the device, for the output stage to compose there."""

    alpha8: np.ndarray  # (H, W) uint8
    device_levels: torch.Tensor | None = None
    device_rgb: torch.Tensor | None = None

    @property
    def levels(self) -> np.ndarray:
        """float32 (H, W) in [0, 1]: alpha8 / 255."""
        return self.alpha8.astype(np.float32) / np.float32(255.0)

    @property
    def size(self) -> tuple[int, int]:
        return self.alpha8.shape[1], self.alpha8.shape[0]

    @property
    def on_device(self) -> bool:
        return self.device_levels is not None and self.device_rgb is not None


@dataclass(frozen=True)
class EncodedImage:
    """Encoded output file and the metadata fal's `ImageFile` reports."""

    data: bytes
    content_type: str
    extension: str  # with the dot, e.g. ".png"
    width: int
    height: int

    @property
    def file_size(self) -> int:
        return len(self.data)


@dataclass(frozen=True)
class RenderedOutputs:
    """Encoded results of one job. With `mask_only`, `image` holds the mask and `mask` is None."""

    image: EncodedImage
    mask: EncodedImage | None


@dataclass(frozen=True)
class EncodeOptions:
    """The encoders' settings (BIREFNET_PNG_COMPRESS_LEVEL, _WEBP_QUALITY, _JPEG_QUALITY, _AVIF_QUALITY)."""

    png_compress_level: int = 1
    webp_quality: int = 90
    jpeg_quality: int = 90
    avif_quality: int = 80

    @classmethod
    def from_settings(cls, settings) -> EncodeOptions:
        return cls(
            png_compress_level=settings.png_compress_level,
            webp_quality=settings.webp_quality,
            jpeg_quality=settings.jpeg_quality,
            avif_quality=settings.avif_quality,
        )
