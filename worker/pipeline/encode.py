"""Encoding: uint8 pixels -> an output file (`encode`), one function for every format fal and the extensions
offer: png, webp, gif, jpeg, avif. Masks are lossless (a mask in jpeg/avif is a PNG).

* PNG: the worker's own writer: rows with the "up" filter (one numpy subtraction) deflated by zlib-ng
  level 1 by default (the fastest), libdeflate at higher levels (smaller files), zlib-ng for grey masks
  (it matches their flat runs about 4x faster than libdeflate), in a container written here
  (IHDR/IDAT/IEND). libpng at its fastest settings spends most of its time choosing filters; this is
  3-5x faster at a similar size (bench/bench_engine.py).
* WebP: lossy colour at `webp_quality` with lossless alpha; masks fully lossless (WebP has no grey mode:
  a mask is stored as grey RGB).
* GIF: 256 colours and 1-bit transparency: RGBA is quantised to 255 colours, and pixels with alpha < 128
  take the reserved transparent index 255. A mask is stored as grey levels.
* JPEG (opaque outputs) and AVIF (colour and alpha): Pillow, when it was built with them.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Collection

import imagecodecs
import numpy as np
import PIL
from PIL import Image, features

from common.domain.errors import InvalidInputError
from common.domain.extensions import LOSSY_FORMATS
from worker.pipeline.types import EncodedImage, EncodeOptions

OUTPUT_FORMATS: tuple[str, ...] = ("png", "webp", "gif", "jpeg", "avif")
_CONTENT_TYPES = {
    "png": ("image/png", ".png"),
    "webp": ("image/webp", ".webp"),
    "gif": ("image/gif", ".gif"),
    "jpeg": ("image/jpeg", ".jpg"),
    "avif": ("image/avif", ".avif"),
}
_PILLOW_FEATURES = {"avif": "avif", "jpeg": "jpg", "webp": "webp"}
AVIF_SPEED = 8  # libavif 0 (slowest, smallest) .. 10; 8 keeps a 1 MP encode well under a second on CPU


def encode(pixels: np.ndarray, fmt: str, options: EncodeOptions, *, mask: bool = False) -> EncodedImage:
    """uint8 (H, W) grey, (H, W, 3) RGB or (H, W, 4) RGBA -> the file in `fmt`; `mask`: lossless."""
    fmt = fmt.lower()
    if fmt not in _CONTENT_TYPES:
        raise ValueError(f"unsupported output format {fmt!r}; expected one of {OUTPUT_FORMATS}")
    if mask and fmt in LOSSY_FORMATS:
        fmt = "png"
    height, width = pixels.shape[:2]
    if fmt == "png":
        data = encode_png(pixels, options.png_compress_level)
    else:
        mode = "L" if pixels.ndim == 2 else {3: "RGB", 4: "RGBA"}[pixels.shape[2]]
        data = _pillow(Image.fromarray(pixels, mode), fmt, options, lossless=mask)
    content_type, extension = _CONTENT_TYPES[fmt]
    return EncodedImage(data=data, content_type=content_type, extension=extension, width=width, height=height)


def _pillow(image: Image.Image, fmt: str, options: EncodeOptions, *, lossless: bool) -> bytes:
    buffer = io.BytesIO()
    if fmt == "webp":
        if lossless:
            image.save(buffer, format="WEBP", lossless=True, quality=100, method=4)
        else:
            image.save(buffer, format="WEBP", quality=options.webp_quality, alpha_quality=100, method=4)
    elif fmt == "gif":
        gif_options = {"transparency": _GIF_TRANSPARENT_INDEX} if image.mode == "RGBA" else {}
        _gif_ready(image).save(buffer, format="GIF", **gif_options)
    elif fmt == "jpeg":
        image.convert("RGB").save(buffer, format="JPEG", quality=options.jpeg_quality, optimize=True)
    else:
        image.save(buffer, format="AVIF", quality=options.avif_quality, speed=AVIF_SPEED)
    return buffer.getvalue()


# --- Capabilities ---


def supported_formats() -> frozenset[str]:
    """The output formats this worker can write: the installed Pillow's feature flags decide."""
    return frozenset(
        fmt for fmt in OUTPUT_FORMATS if fmt not in _PILLOW_FEATURES or features.check(_PILLOW_FEATURES[fmt])
    )


def check_output_format(fmt: str, supported: Collection[str]) -> None:
    """A 422 for formats this worker cannot write (`supported`: what it offers), before any work is done."""
    if fmt in supported:
        return
    feature = _PILLOW_FEATURES.get(fmt)
    if feature is None or features.check(feature):
        why = "it is switched off on this worker (simulated as missing)"
    else:
        why = f"its image library (Pillow {PIL.__version__}) was built without {fmt.upper()} support"
    raise InvalidInputError(
        f"output_format '{fmt}' is not supported by this server: {why}; use png, webp or gif",
        field="output_format",
        error_type="unsupported_output_format",
    )


# --- PNG ---


def _chunk(kind: bytes, payload: bytes | bytearray) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(payload, zlib.crc32(kind)))
    )


def encode_png(pixels: np.ndarray, level: int = 1) -> bytes:
    """(H, W) grey or (H, W, 3|4) uint8 -> PNG bytes: every row "up"-filtered, then deflated: colour at
    level 0-1 by zlib-ng level 1 (the fastest), at 2-12 by libdeflate at that level; grey by zlib-ng at
    `level`, 2 at least."""
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3):
        raise ValueError(f"expected uint8 (H, W[, C]) pixels, got {pixels.dtype} {pixels.shape}")
    height, width = pixels.shape[:2]
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    colour_type = {1: 0, 3: 2, 4: 6}[channels]
    rows = np.ascontiguousarray(pixels).reshape(height, width * channels)
    filtered = np.empty((height, width * channels + 1), dtype=np.uint8)
    filtered[:, 0] = 2  # filter type "up": each byte minus the one above it (mod 256)
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])
    # imagecodecs takes any buffer; its stubs say bytes only (hence the ignores)
    if channels == 1:  # masks: long flat runs, where zlib-ng's matcher is ~4x libdeflate's speed at ~+10 %
        compressed = imagecodecs.zlibng_encode(filtered, level=max(2, min(9, level)))  # type: ignore[arg-type]
    elif level <= 1:  # the fastest: zlib-ng level 1, ~0.6x libdeflate level 1's CPU, ~1.45x its size
        compressed = imagecodecs.zlibng_encode(filtered, level=1)  # type: ignore[arg-type]
    else:
        compressed = imagecodecs.deflate_encode(filtered, level=min(12, level))  # type: ignore[arg-type]
    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", compressed) + _chunk(b"IEND", b"")


# --- GIF ---


_GIF_TRANSPARENT_INDEX = 255


def _gif_ready(image: Image.Image) -> Image.Image:
    if image.mode != "RGBA":
        return image if image.mode in ("L", "P") else image.convert("RGB")
    alpha = np.asarray(image.getchannel("A"))
    # Quantise to 255 colours so index 255 is free for transparency.
    paletted = image.convert("RGB").quantize(colors=255, method=Image.Quantize.MEDIANCUT)
    indices = np.asarray(paletted).copy()
    indices[alpha < 128] = _GIF_TRANSPARENT_INDEX
    palette = (paletted.getpalette() or [])[: 255 * 3]
    palette += [0] * (255 * 3 - len(palette)) + [0, 0, 0]
    out = Image.fromarray(indices, "P")
    out.putpalette(palette)
    return out
