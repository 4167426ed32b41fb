"""The reference (slower) ways of doing what the worker's pipeline does fast, kept for comparisons: the
benchmarks measure them beside the worker's stages, and the tests check the fast paths against them.

* `refined_colours`: blur fusion with torch (`refine_foreground`) on a PIL image and a float mask.
* `compose_cutout` / `rgba_from` / `mask_to_image`: RGBA cut-out and 8-bit mask as PIL images.
* `encode_image`: a PIL image through Pillow's encoders (PNG through libpng).
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from worker.pipeline.encode import encode
from worker.pipeline.postprocess import to_alpha8
from worker.pipeline.refine import refine_foreground
from worker.pipeline.types import EncodedImage, EncodeOptions


def mask_to_image(mask: np.ndarray) -> Image.Image:
    """Float mask in [0, 1] (H, W) -> 8-bit greyscale ("L") image."""
    return Image.fromarray(to_alpha8(mask), "L")


def refined_colours(image: Image.Image, mask: np.ndarray, device: torch.device | str = "cpu") -> np.ndarray:
    """`refine_foreground` on a PIL image and float mask; returns (H, W, 3) uint8 colours."""
    with torch.inference_mode():
        image_t = torch.from_numpy(np.array(image)).to(device).permute(2, 0, 1).float().div_(255.0)
        mask_t = torch.from_numpy(np.asarray(mask, dtype=np.float32)).to(device)
        refined = refine_foreground(image_t, mask_t)
        out = refined.mul_(255.0).round_().to(torch.uint8).permute(1, 2, 0).contiguous()
        return out.cpu().numpy()


def rgba_from(rgb: np.ndarray, mask: np.ndarray) -> Image.Image:
    """(H, W, 3) uint8 colours + (H, W) float mask -> RGBA image with the mask as alpha."""
    height, width = rgb.shape[:2]
    if mask.shape != (height, width):
        raise ValueError(f"mask is {mask.shape[1]}x{mask.shape[0]}, image is {width}x{height}")
    rgba = np.empty((height, width, 4), dtype=np.uint8)
    rgba[..., :3] = rgb
    rgba[..., 3] = to_alpha8(mask)
    return Image.fromarray(rgba, "RGBA")


def compose_cutout(
    image: Image.Image, mask: np.ndarray, *, refine: bool = True, device: torch.device | str = "cpu"
) -> Image.Image:
    """RGBA cut-out at the input's size: colours (refined or as decoded) plus the mask as alpha."""
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {image.mode}")
    if mask.shape != (image.height, image.width):
        raise ValueError(f"mask is {mask.shape[1]}x{mask.shape[0]}, image is {image.width}x{image.height}")
    rgb = refined_colours(image, mask, device) if refine else np.asarray(image)
    return rgba_from(rgb, mask)


def encode_image(
    image: Image.Image,
    fmt: str,
    *,
    png_compress_level: int = 6,
    webp_quality: int = 90,
    lossless: bool = False,
) -> EncodedImage:
    """An RGBA cut-out or an L mask as png (Pillow's libpng), webp or gif (the worker's encoder)."""
    fmt = fmt.lower()
    if fmt not in ("png", "webp", "gif"):
        raise ValueError(f"unsupported output format {fmt!r}; expected one of png, webp, gif")
    if fmt != "png":
        return encode(np.asarray(image), fmt, EncodeOptions(webp_quality=webp_quality), mask=lossless)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=png_compress_level)
    return EncodedImage(
        data=buffer.getvalue(),
        content_type="image/png",
        extension=".png",
        width=image.width,
        height=image.height,
    )
