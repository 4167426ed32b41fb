"""The output stage: (image, Mask, job parameters) -> encoded cut-out and mask files (`render`).

fal's outputs (cut-out at the input's size, optional mask, mask_only) and the extension fields (crop to
subject, background colour or image, JPEG/AVIF) are one path: refine the foreground colours at the
input's size, cut the subject's box out (padding beyond the input is transparent), composite onto the
background fitted to the output, encode (worker.pipeline.encode). Masks stay exact: with jpeg/avif they
are PNG.

On the CPU the work runs in the job's thread on GIL-free libraries; with a mask still on the device (CUDA,
fal's outputs) refinement and composition run there and one 8-bit RGBA copy comes back for encoding.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps

from common.domain.errors import InvalidInputError
from common.domain.extensions import BackgroundFit, parse_aspect_ratio, parse_hex_color, parse_margin
from common.domain.schemas import JobParams
from worker.pipeline.encode import OUTPUT_FORMATS, encode
from worker.pipeline.postprocess import to_alpha8
from worker.pipeline.prepare import as_rgb_array
from worker.pipeline.refine import refine_colours, refine_foreground
from worker.pipeline.types import EncodeOptions, ImageLike, Mask, RenderedOutputs
from worker.timings import StageTimings

_UNLIMITED = 1 << 62


def render(
    image: ImageLike,
    mask: Mask,
    params: JobParams,
    *,
    encoding: EncodeOptions,
    background: ImageLike | None = None,
    max_side: int = _UNLIMITED,
    max_pixels: int = _UNLIMITED,
    timings: StageTimings | None = None,
) -> RenderedOutputs:
    """The job's output files. `background`: the decoded background_image_url; `max_side`/`max_pixels`:
    the limits a cropped output (which may reach beyond the input) must keep."""
    timings = timings if timings is not None else StageTimings()
    fmt = params.output_format.lower()
    if fmt not in OUTPUT_FORMATS:
        raise InvalidInputError(
            f"output_format must be one of {OUTPUT_FORMATS}, got {params.output_format!r}",
            field="output_format",
        )
    refine = params.refine_foreground and not params.mask_only
    if mask.on_device and not params.extended and not params.mask_only:
        assert mask.device_rgb is not None and mask.device_levels is not None
        with timings.stage("refine" if refine else "compose"):
            output, _ = device_cutout(mask.device_rgb, mask.device_levels, refine=refine)
        with timings.stage("encode"):
            return RenderedOutputs(
                image=encode(output, fmt, encoding),
                mask=encode(mask.alpha8, fmt, encoding, mask=True) if params.output_mask else None,
            )
    box = (0, 0, *mask.size)
    if params.crop_to_subject:
        box = subject_box(
            mask.levels,
            threshold=params.crop_threshold,
            margin=params.crop_margin,
            aspect_ratio=params.crop_aspect_ratio,
        )
        _check_output_size(box[2] - box[0], box[3] - box[1], max_side, max_pixels)
    alpha = crop_padded(mask.alpha8, box)
    if params.mask_only:
        with timings.stage("encode"):
            return RenderedOutputs(image=encode(alpha, fmt, encoding, mask=True), mask=None)
    rgb = as_rgb_array(image)
    if rgb.shape[:2] != mask.alpha8.shape:
        raise ValueError(f"mask is {mask.size[0]}x{mask.size[1]}, image is {rgb.shape[1]}x{rgb.shape[0]}")
    with timings.stage("refine"):
        colours = refine_colours(rgb, mask.levels, mask.alpha8) if refine else rgb
    with timings.stage("compose"):
        output = rgba_array(crop_padded(colours, box), alpha)
        if params.has_background:
            layer = background_layer(
                (output.shape[1], output.shape[0]),
                color=params.background_color,
                image=None if background is None else Image.fromarray(as_rgb_array(background)),
                fit=params.background_fit,
            )
            composed = Image.alpha_composite(layer, Image.fromarray(output, "RGBA"))
            output = np.asarray(composed.convert("RGB") if params.opaque_background else composed)
    with timings.stage("encode"):
        return RenderedOutputs(
            image=encode(output, fmt, encoding),
            mask=encode(alpha, fmt, encoding, mask=True) if params.output_mask else None,
        )


def cutout(rgb: np.ndarray, mask: Mask, *, refine: bool) -> np.ndarray:
    """CPU: (H, W, 4) uint8, the image's colours (refined or as decoded) with the mask as alpha."""
    return rgba_array(refine_colours(rgb, mask.levels, mask.alpha8) if refine else rgb, mask.alpha8)


def rgba_array(rgb: np.ndarray, alpha8: np.ndarray) -> np.ndarray:
    """(H, W, 3) + (H, W) uint8 -> (H, W, 4) uint8."""
    return cv2.merge([rgb[..., 0], rgb[..., 1], rgb[..., 2], alpha8])


def device_cutout(rgb: torch.Tensor, levels: torch.Tensor, *, refine: bool) -> tuple[np.ndarray, np.ndarray]:
    """Device: (3, H, W) uint8 image and (H, W) float mask -> host (H, W, 4) RGBA and (H, W) mask, uint8:
    refinement and composition run where the tensors are; one copy back of each."""
    with torch.inference_mode():
        alpha8 = to_alpha8(levels)
        if refine:
            colours = refine_foreground(rgb.float().div_(255.0), levels).mul_(255.0).round_().to(torch.uint8)
        else:
            colours = rgb
        rgba = torch.cat([colours, alpha8[None]], dim=0).permute(1, 2, 0).contiguous()
        return rgba.cpu().numpy(), alpha8.cpu().numpy()


# --- Crop to subject and background ---


def subject_box(
    mask: np.ndarray,
    *,
    threshold: float,
    margin: str | int | float = 0,
    aspect_ratio: str | float | None = None,
) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the output in input pixels: the bounding box of `mask >= threshold`,
    plus the margin, grown around its centre to the aspect ratio. It may reach beyond the input."""
    subject = mask >= np.float32(threshold)
    rows = np.flatnonzero(subject.any(axis=1))
    if rows.size == 0:
        raise InvalidInputError(
            f"crop_to_subject: no pixel of the mask reaches crop_threshold {threshold:g}, so there is no "
            f"subject "
            "to crop to (lower crop_threshold, or leave crop_to_subject off)",
            field="crop_to_subject",
            error_type="subject_not_found",
        )
    cols = np.flatnonzero(subject[rows[0] : rows[-1] + 1].any(axis=0))
    left, right, top, bottom = int(cols[0]), int(cols[-1]) + 1, int(rows[0]), int(rows[-1]) + 1
    dx, dy = parse_margin(margin).pixels(right - left, bottom - top)
    left, right, top, bottom = left - dx, right + dx, top - dy, bottom + dy
    if aspect_ratio is not None:
        ratio = parse_aspect_ratio(aspect_ratio)
        width, height = right - left, bottom - top
        if width / height < ratio:
            grow = round(height * ratio) - width
            left -= grow // 2
            right += grow - grow // 2
        else:
            grow = round(width / ratio) - height
            top -= grow // 2
            bottom += grow - grow // 2
    return left, top, right, bottom


def crop_padded(array: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """`array[top:bottom, left:right]` with zeros wherever the box lies outside the array."""
    left, top, right, bottom = box
    height, width = array.shape[:2]
    if left >= 0 and top >= 0 and right <= width and bottom <= height:
        return array[top:bottom, left:right]
    out = np.zeros((bottom - top, right - left, *array.shape[2:]), dtype=array.dtype)
    x0, y0, x1, y1 = max(left, 0), max(top, 0), min(right, width), min(bottom, height)
    if x0 < x1 and y0 < y1:
        out[y0 - top : y1 - top, x0 - left : x1 - left] = array[y0:y1, x0:x1]
    return out


def _check_output_size(width: int, height: int, max_side: int, max_pixels: int) -> None:
    if max(width, height) > max_side or width * height > max_pixels:
        raise InvalidInputError(
            f"the cropped output would be {width}x{height}; the limits are {max_side} pixels a side "
            f"and {max_pixels:,} pixels: use a smaller crop_margin or crop_aspect_ratio",
            field="crop_margin",
        )


# --- Background ---


def background_layer(
    size: tuple[int, int], *, color: str | None, image: Image.Image | None, fit: str = BackgroundFit.COVER
) -> Image.Image:
    """The RGBA layer behind the cut-out: the colour (or transparent), with the image fitted on top."""
    fill = parse_hex_color(color) if color else (0, 0, 0, 0)
    if image is None:
        return Image.new("RGBA", size, fill)
    rgb = image.convert("RGB")
    if fit == BackgroundFit.STRETCH:
        fitted = rgb.resize(size, Image.Resampling.LANCZOS)
    elif fit == BackgroundFit.CONTAIN:
        return ImageOps.pad(rgb.convert("RGBA"), size, Image.Resampling.LANCZOS, color=fill)
    else:
        fitted = ImageOps.fit(rgb, size, Image.Resampling.LANCZOS)
    return fitted.convert("RGBA")
