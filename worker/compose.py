"""The output stage beyond fal: background compositing, crop to subject, JPEG and AVIF.

`render_job_outputs` is the output stage's one entry point (worker.runner calls it). Requests without
extension fields go to `Predictor.render_outputs` unchanged; the rest are rendered here from the same
building blocks (worker.imaging): refine the foreground colours at the input's size, cut the subject's box
out (padding beyond the input is transparent), composite onto the background fitted to the output, encode.
Masks stay exact: with jpeg/avif they are PNG.
"""

from __future__ import annotations

import io
from collections.abc import Collection

import numpy as np
import PIL
from PIL import Image, ImageOps, features

from common.domain.errors import InvalidInputError
from common.domain.extensions import (
    LOSSY_FORMATS,
    BackgroundFit,
    parse_aspect_ratio,
    parse_hex_color,
    parse_margin,
)
from common.domain.schemas import JobParams
from common.settings import WorkerSettings
from worker import pixels
from worker.imaging import EncodedImage, encode_image, mask_to_image
from worker.rendering import DeviceMask, RenderedOutputs
from worker.timings import StageTimings

_PILLOW_FEATURES = {"avif": "avif", "jpeg": "jpg", "webp": "webp"}
_CONTENT_TYPES = {"jpeg": ("image/jpeg", ".jpg"), "avif": ("image/avif", ".avif")}
AVIF_SPEED = 8  # libavif 0 (slowest, smallest) .. 10; 8 keeps a 1 MP encode well under a second on CPU


# --- Capabilities ---


def output_format_supported(fmt: str, simulated_unsupported: Collection[str] = ()) -> bool:
    """Whether this worker can encode `fmt`: the installed Pillow's feature flag, minus the formats the
    testing-only switch BIREFNET_TEST_UNSUPPORTED_OUTPUT_FORMATS (`simulated_unsupported`) turns off."""
    if fmt in simulated_unsupported:
        return False
    feature = _PILLOW_FEATURES.get(fmt)
    return feature is None or bool(features.check(feature))


def check_output_format(fmt: str, simulated_unsupported: Collection[str] = ()) -> None:
    """A 422 for formats this worker cannot write, before any work is done for the job."""
    if not output_format_supported(fmt, simulated_unsupported):
        simulated = " (simulated: BIREFNET_TEST_UNSUPPORTED_OUTPUT_FORMATS)" if (
            fmt in simulated_unsupported) else ""
        raise InvalidInputError(
            f"output_format '{fmt}' is not supported by this server: its image library (Pillow {PIL.__version__}) "
            f"was built without {fmt.upper()} support{simulated}; use png, webp or gif",
            field="output_format", error_type="unsupported_output_format")


# --- Masks ---


def quantise_mask(mask: np.ndarray) -> np.ndarray:
    """The float mask at 8-bit precision (what the output mask holds), so that a mask kept as an 8-bit PNG
    and used again renders exactly the pixels of the first run."""
    levels = np.rint(np.asarray(mask, dtype=np.float32) * np.float32(255.0))
    np.clip(levels, 0, 255, out=levels)
    return levels / np.float32(255.0)


def mask_from_png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
        levels = np.asarray(image.convert("L"), dtype=np.float32)
    return levels / np.float32(255.0)


def mask_png(mask: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    mask_to_image(mask).save(buffer, format="PNG", compress_level=3)
    return buffer.getvalue()


# --- Crop to subject ---


def subject_box(mask: np.ndarray, *, threshold: float, margin: str | int | float = 0,
                aspect_ratio: str | float | None = None) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the output in input pixels: the bounding box of `mask >= threshold`,
    plus the margin, grown around its centre to the aspect ratio. It may reach beyond the input."""
    subject = mask >= np.float32(threshold)
    rows = np.flatnonzero(subject.any(axis=1))
    if rows.size == 0:
        raise InvalidInputError(
            f"crop_to_subject: no pixel of the mask reaches crop_threshold {threshold:g}, so there is no subject "
            "to crop to (lower crop_threshold, or leave crop_to_subject off)",
            field="crop_to_subject", error_type="subject_not_found")
    cols = np.flatnonzero(subject[rows[0]:rows[-1] + 1].any(axis=0))
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
        out[y0 - top:y1 - top, x0 - left:x1 - left] = array[y0:y1, x0:x1]
    return out


def _check_output_size(width: int, height: int, settings: WorkerSettings) -> None:
    if max(width, height) > settings.max_input_side or width * height > settings.max_input_pixels:
        raise InvalidInputError(
            f"the cropped output would be {width}x{height}; the limits are {settings.max_input_side} pixels a side "
            f"and {settings.max_input_pixels:,} pixels: use a smaller crop_margin or crop_aspect_ratio",
            field="crop_margin")


# --- Background ---


def background_layer(size: tuple[int, int], *, color: str | None, image: Image.Image | None,
                     fit: str = BackgroundFit.COVER) -> Image.Image:
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


# --- Encoding ---


def encode(image: Image.Image, fmt: str, settings: WorkerSettings, *, mask: bool = False) -> EncodedImage:
    """fal's formats through worker.imaging; JPEG and AVIF here. Masks in a lossy format are PNG."""
    if fmt in LOSSY_FORMATS and mask:
        fmt = "png"
    if fmt not in _CONTENT_TYPES:
        return encode_image(image, fmt, png_compress_level=settings.png_compress_level,
                            webp_quality=settings.webp_quality, lossless=mask)
    buffer = io.BytesIO()
    if fmt == "jpeg":
        image.convert("RGB").save(buffer, format="JPEG", quality=settings.jpeg_quality, optimize=True)
    else:
        image.save(buffer, format="AVIF", quality=settings.avif_quality, speed=AVIF_SPEED)
    content_type, extension = _CONTENT_TYPES[fmt]
    return EncodedImage(data=buffer.getvalue(), content_type=content_type, extension=extension,
                        width=image.width, height=image.height)


# --- The output stage ---


def render_extended(image: Image.Image, mask: np.ndarray, params: JobParams, *, background: Image.Image | None,
                    device, settings: WorkerSettings, timings: StageTimings | None = None) -> RenderedOutputs:
    """Outputs with the extension fields applied (see the module docstring)."""
    timings = timings if timings is not None else StageTimings()
    fmt = params.output_format
    box = (0, 0, image.width, image.height)
    if params.crop_to_subject:
        box = subject_box(mask, threshold=params.crop_threshold, margin=params.crop_margin,
                          aspect_ratio=params.crop_aspect_ratio)
        _check_output_size(box[2] - box[0], box[3] - box[1], settings)
    alpha = crop_padded(mask, box)

    def encoded_mask() -> EncodedImage:
        return encode(mask_to_image(alpha), fmt, settings, mask=True)

    if params.mask_only:
        with timings.stage("encode"):
            return RenderedOutputs(image=encoded_mask(), mask=None)
    with timings.stage("refine"):
        # the plain path's refinement (worker.pixels), so both paths give the same colours
        colours = (pixels.refine_colours(np.asarray(image), np.asarray(mask, dtype=np.float32))
                   if params.refine_foreground else np.asarray(image))
    with timings.stage("compose"):
        rgba = np.empty((box[3] - box[1], box[2] - box[0], 4), dtype=np.uint8)
        rgba[..., :3] = crop_padded(colours, box)
        rgba[..., 3] = np.asarray(mask_to_image(alpha))
        output = Image.fromarray(rgba, "RGBA")
        if params.has_background:
            layer = background_layer(output.size, color=params.background_color, image=background,
                                     fit=params.background_fit)
            output = Image.alpha_composite(layer, output)
            if params.opaque_background:
                output = output.convert("RGB")
    with timings.stage("encode"):
        return RenderedOutputs(image=encode(output, fmt, settings), mask=encoded_mask() if params.output_mask else None)


def render_job_outputs(predictor, image: Image.Image, mask: np.ndarray, params: JobParams, *,
                       background: Image.Image | None = None, timings: StageTimings | None = None,
                       device_mask: DeviceMask | None = None) -> RenderedOutputs:
    """The worker's output stage: fal's rendering, or the extended one when extension fields are set.
    `device_mask` (CUDA, the network ran for this job): the same mask on the GPU, so fal's rendering
    refines and composes there and copies back only the 8-bit outputs."""
    if not params.extended:
        if device_mask is not None and device_mask.prepared.device_rgb is None:
            device_mask = None  # no image on the device to compose with: the CPU path
        return predictor.render_outputs(image, mask if device_mask is None else device_mask.levels,
                                        output_format=params.output_format,
                                        output_mask=params.output_mask, refine_foreground=params.refine_foreground,
                                        mask_only=params.mask_only, timings=timings,
                                        prepared=None if device_mask is None else device_mask.prepared)
    return render_extended(image, mask, params, background=background, device=predictor.device,
                           settings=predictor.settings, timings=timings)
