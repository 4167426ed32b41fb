"""The output stage: (image, mask) -> encoded cut-out and mask files.

On the CPU the work runs in the job's thread on GIL-free libraries (worker.pixels); on CUDA the mask and
the uploaded image stay on the device through refinement and composition, and one 8-bit RGBA (and mask)
copy comes back for encoding.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from common.domain.errors import InvalidInputError
from worker import pixels
from worker.imaging import OUTPUT_FORMATS, EncodedImage, encode_image, refine_foreground
from worker.timings import StageTimings

if TYPE_CHECKING:
    from worker.engine import ImageLike, PreparedImage

DEFAULT_PNG_COMPRESS_LEVEL = 1
DEFAULT_WEBP_QUALITY = 90


@dataclass(frozen=True)
class RenderedOutputs:
    """Encoded results of one job. With `mask_only`, `image` holds the mask and `mask` is None."""

    image: EncodedImage
    mask: EncodedImage | None


def device_cutout(rgb: torch.Tensor, mask: torch.Tensor, *, refine: bool) -> tuple[np.ndarray, np.ndarray]:
    """(3, H, W) uint8 image and (H, W) float mask on a device -> host (H, W, 4) RGBA and (H, W) mask,
    uint8: refinement and composition run where the tensors are; one copy back of each."""
    alpha8 = mask.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)
    if refine:
        colours = refine_foreground(rgb.float().div_(255.0), mask).mul_(255.0).round_().to(torch.uint8)
    else:
        colours = rgb
    rgba = torch.cat([colours, alpha8[None]], dim=0).permute(1, 2, 0).contiguous()
    return rgba.cpu().numpy(), alpha8.cpu().numpy()


@dataclass
class DeviceMask:
    """A job's mask kept on the GPU for the output stage (CUDA): float (H, W) at 8-bit levels, beside the
    prepared image whose uploaded `device_rgb` it composes with."""

    levels: torch.Tensor
    prepared: PreparedImage


def quantise_device_mask(mask: torch.Tensor, prepared: PreparedImage) -> tuple[DeviceMask, np.ndarray]:
    """A device mask at 8-bit levels (what the output mask holds) and its one copy to the host, as float32
    (H, W): the host copy is what is kept and cached, the device one what is rendered."""
    with torch.inference_mode():
        alpha8 = mask.float().mul(255.0).round_().clamp_(0, 255).to(torch.uint8)
        host = alpha8.cpu().numpy().astype(np.float32) / np.float32(255.0)
        return DeviceMask(levels=alpha8.float().div_(255.0), prepared=prepared), host


def encode_pixels(pixels_: np.ndarray, fmt: str, *, png_compress_level: int, webp_quality: int,
                  lossless: bool = False) -> EncodedImage:
    """uint8 (H, W) grey or (H, W, 4) RGBA -> encoded file. PNG takes the fast path (worker.pixels);
    WebP and GIF go through Pillow (imaging.encode_image)."""
    height, width = pixels_.shape[:2]
    if fmt == "png":
        return EncodedImage(data=pixels.encode_png(pixels_, png_compress_level), content_type="image/png",
                            extension=".png", width=width, height=height)
    image = Image.fromarray(pixels_, "L" if pixels_.ndim == 2 else "RGBA")
    return encode_image(image, fmt, png_compress_level=png_compress_level, webp_quality=webp_quality,
                        lossless=lossless)


def render_outputs(image: ImageLike | None, mask: np.ndarray | torch.Tensor, *, output_format: str,
                   output_mask: bool, refine_foreground: bool, mask_only: bool,
                   device: torch.device | str | None = None, timings: StageTimings | None = None,
                   png_compress_level: int = DEFAULT_PNG_COMPRESS_LEVEL,
                   webp_quality: int = DEFAULT_WEBP_QUALITY,
                   device_rgb: torch.Tensor | None = None) -> RenderedOutputs:
    """Encode the cut-out (RGBA, input size) and, if asked, the mask (8-bit grey), in `output_format`.

    `mask_only` returns just the mask (as `image`) and skips the foreground refinement. The CPU path
    (a numpy mask) runs in the calling thread on GIL-free libraries (worker.pixels); a torch `mask`
    on a device with `device_rgb` there too composes on that device (`device_cutout`). `device` is
    accepted for compatibility; the mask's type decides the path.

    This is the output stage: the one place that turns (image, mask) into files.
    """
    del device
    fmt = output_format.lower()
    if fmt not in OUTPUT_FORMATS:
        raise InvalidInputError(f"output_format must be one of {OUTPUT_FORMATS}, got {output_format!r}",
                                field="output_format")
    timings = timings if timings is not None else StageTimings()
    encode = partial(encode_pixels, png_compress_level=png_compress_level, webp_quality=webp_quality)
    if isinstance(mask, torch.Tensor) and device_rgb is not None:
        with timings.stage("refine" if refine_foreground and not mask_only else "compose"):
            cutout, alpha8 = device_cutout(device_rgb, mask, refine=refine_foreground and not mask_only)
    else:
        if isinstance(mask, torch.Tensor):
            mask = mask.detach().to("cpu", torch.float32).numpy()
        with timings.stage("compose"):
            alpha8 = pixels.mask_to_uint8(np.asarray(mask, dtype=np.float32))
        if not mask_only:
            assert image is not None, "the CPU path composes onto the decoded image"
            rgb = pixels.as_rgb_array(image)
            if alpha8.shape != rgb.shape[:2]:
                raise ValueError(f"mask is {alpha8.shape[1]}x{alpha8.shape[0]}, "
                                 f"image is {rgb.shape[1]}x{rgb.shape[0]}")
            with timings.stage("refine"):
                colours = pixels.refine_colours(rgb, mask, alpha8) if refine_foreground else rgb
            with timings.stage("compose"):
                cutout = pixels.rgba_array(colours, alpha8)
    with timings.stage("encode"):
        if mask_only:
            return RenderedOutputs(image=encode(alpha8, fmt, lossless=True), mask=None)
        encoded = encode(cutout, fmt)
        encoded_mask = encode(alpha8, fmt, lossless=True) if output_mask else None
    return RenderedOutputs(image=encoded, mask=encoded_mask)
