"""The worker's CPU pixel path: numpy arrays through libraries that release the GIL.

Chosen by measurement (bench/bench_engine.py, docs/benchmarks.md "Per-image CPU work"):

* decode: JPEGs that need no colour management go through libjpeg-turbo via simplejpeg (about 2-4x
  Pillow's decoder here); everything else, and anything odd, goes through `imaging.decode_image`, which
  stays the one place that knows about modes, ICC profiles and guards.
* resize: OpenCV (INTER_AREA when shrinking, bilinear otherwise) on uint8, then one normalising pass.
* refine: the two-pass blur fusion of `imaging.refine_foreground`, evaluated only where it changes a
  pixel. With F = Fb + a(I - Bb - a(Fb - Bb)), an opaque pixel (a = 1) is I exactly, so the full-size
  work is limited to tiles that hold partly transparent pixels; the wide first pass (a 90-pixel box
  over smooth fields) runs on a downscaled copy and is sampled bilinearly. OpenCV box filters.
* PNG: rows with the "up" filter (one numpy subtraction) deflated by zlib-ng level 1 by default (the
  fastest), libdeflate at higher levels (smaller files), zlib-ng for grey masks (it matches their flat
  runs about 4x faster than libdeflate), in a container written here (IHDR/IDAT/IEND). libpng at its fastest settings (through Pillow, OpenCV or imagecodecs) spends most
  of its time choosing filters; this is 3-5x faster at a similar size.
"""

from __future__ import annotations

import io
import struct
import zlib

import cv2
import imagecodecs
import numpy as np
import simplejpeg
from PIL import Image

from worker.imaging import MIN_SIDE, decode_image

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
_SCALE = (1.0 / (255.0 * IMAGENET_STD)).astype(np.float32)
_OFFSET = (IMAGENET_MEAN / IMAGENET_STD).astype(np.float32)

REFINE_RADII = (90, 6)  # box sizes of the two blur-fusion passes (as imaging.refine_foreground)
_EPS = 1e-5
_TILE = 32  # refine tiles (horizontal runs of them are merged, which keeps Python overhead small)
_WIDE_PASS_BOX = 30  # the 90-box pass runs at 1/3 scale (box 30); its fields are smooth

cv2.setNumThreads(1)  # parallelism comes from job threads; OpenCV's own pool would oversubscribe


# --- Decoding ---

_ORIENT = {  # EXIF orientation -> numpy transform of an (H, W, C) array
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: a.transpose(1, 0, 2)[:, ::-1],
    7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],
    8: lambda a: a.transpose(1, 0, 2)[::-1],
}


def decode_rgb(data: bytes, *, max_pixels: int, max_side: int, min_side: int = MIN_SIDE) -> np.ndarray:
    """Bytes -> (H, W, 3) uint8 RGB, EXIF orientation applied; same results and errors as
    `imaging.decode_image`, which handles every case the fast JPEG path does not take."""
    fast = _fast_jpeg(data, max_pixels=max_pixels, max_side=max_side, min_side=min_side)
    if fast is not None:
        return fast
    return np.asarray(decode_image(data, max_pixels=max_pixels, max_side=max_side, min_side=min_side))


def _fast_jpeg(data: bytes, *, max_pixels: int, max_side: int, min_side: int) -> np.ndarray | None:
    """libjpeg-turbo for a plain baseline/progressive YCbCr or grey JPEG within the limits; None
    (use the general decoder) for anything else: CMYK, ICC profiles, MPO, odd headers, bad data."""
    if not data.startswith(b"\xff\xd8"):
        return None
    try:
        with Image.open(io.BytesIO(data), formats=("JPEG",)) as header:  # header only, no pixels
            width, height = header.size
            if (header.format != "JPEG" or header.mode not in ("RGB", "L") or header.info.get("icc_profile")
                    or width * height > max_pixels or max(width, height) > max_side
                    or min(width, height) < min_side):
                return None
            orientation = header.getexif().get(0x0112, 1)
        rgb = simplejpeg.decode_jpeg(data, colorspace="RGB")
    except Exception:  # noqa: BLE001 - the general decoder reports the file's problem properly
        return None
    if rgb.shape[:2] != (height, width):
        return None
    transform = _ORIENT.get(orientation)
    return np.ascontiguousarray(transform(rgb)) if transform else rgb


def as_rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """A decoded image as (H, W, 3) uint8, without copying arrays."""
    if isinstance(image, np.ndarray):
        return image
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {image.mode}")
    return np.asarray(image)


# --- Network input and mask ---


def _interpolation(source: tuple[int, int], target: tuple[int, int]) -> int:
    shrinking = target[0] < source[0] and target[1] < source[1]
    return cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR


def input_array(rgb: np.ndarray, resolution: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, h, w) float32 at `resolution` = (w, h), ImageNet-normalised."""
    height, width = rgb.shape[:2]
    if (width, height) != resolution:
        rgb = cv2.resize(rgb, resolution, interpolation=_interpolation((width, height), resolution))
    out = np.empty((3, resolution[1], resolution[0]), dtype=np.float32)
    for channel, plane in enumerate(cv2.split(rgb)):  # x / (255 std) - mean / std, one pass per plane
        cv2.addWeighted(plane, float(_SCALE[channel]), plane, 0.0, -float(_OFFSET[channel]), dst=out[channel],
                        dtype=cv2.CV_32F)
    return out


def mask_at_size(probabilities: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w) float32 probabilities -> float32 (H, W) mask in [0, 1] at `size` = (W, H)."""
    height, width = probabilities.shape
    if (width, height) != size:
        probabilities = cv2.resize(probabilities, size, interpolation=_interpolation((width, height), size))
    return np.clip(probabilities, 0.0, 1.0, out=probabilities if probabilities.flags.writeable else None)


def mask_to_uint8(mask: np.ndarray) -> np.ndarray:
    """Float mask in [0, 1] -> uint8 (rounded to nearest)."""
    return cv2.convertScaleAbs(mask, alpha=255.0)  # saturating, round-half-even like np.rint


# --- Foreground refinement (blur fusion, see module docstring) ---


def refine_colours(rgb: np.ndarray, mask: np.ndarray, alpha8: np.ndarray | None = None) -> np.ndarray:
    """Blur-fusion foreground colours, (H, W, 3) uint8, for an RGB image and its float mask.

    Opaque pixels keep their colour; transparent pixels away from soft edges become black (the full
    computation makes them ~0 there too: their blurred alpha is ~0); tiles holding partly transparent
    pixels get the two-pass estimate everywhere.
    """
    height, width = rgb.shape[:2]
    if mask.shape != (height, width):
        raise ValueError(f"mask is {mask.shape[1]}x{mask.shape[0]}, image is {width}x{height}")
    mask = np.ascontiguousarray(mask, dtype=np.float32)
    alpha8 = mask_to_uint8(mask) if alpha8 is None else alpha8
    out = cv2.bitwise_and(rgb, rgb, mask=cv2.inRange(alpha8, 1, 255))
    tiles = _tiles_with(cv2.inRange(alpha8, 1, 254))
    if not tiles:
        return out
    box = (REFINE_RADII[1], REFINE_RADII[1])
    halo = REFINE_RADII[1] // 2 + 1
    fields = _wide_pass_fields(rgb, alpha8, REFINE_RADII[0], _tiles_bounds(tiles), halo)
    for y0, y1, x0, x1 in tiles:
        # The tile with a halo, so that box windows of its pixels lie inside; at the image border the
        # region stops there, and OpenCV's REFLECT_101 border matches the full-image filter's.
        ry0, ry1, rx0, rx1 = max(0, y0 - halo), min(height, y1 + halo), max(0, x0 - halo), min(width, x1 + halo)
        image = cv2.multiply(rgb[ry0:ry1, rx0:rx1], 1 / 255, dtype=cv2.CV_32F)  # a scalar operand
        alpha = mask[ry0:ry1, rx0:rx1]
        alpha3 = cv2.merge([alpha, alpha, alpha])  # OpenCV's element-wise ops want equal channel counts
        fg1, bg1 = _sample_fields(fields, (ry0, ry1, rx0, rx1))
        fg1 = _fusion_estimate(image, fg1, bg1, alpha3)
        blurred_alpha = cv2.blur(alpha, box)
        fg2 = cv2.blur(cv2.multiply(fg1, alpha3), box)
        fg2 = cv2.divide(fg2, cv2.merge([blurred_alpha + _EPS] * 3))
        bg2 = cv2.blur(cv2.multiply(bg1, 1 - alpha3), box)
        bg2 = cv2.divide(bg2, cv2.merge([(1 + _EPS) - blurred_alpha] * 3))
        estimate = _fusion_estimate(image, fg2, bg2, alpha3)
        iy, ix = y0 - ry0, x0 - rx0
        out[y0:y1, x0:x1] = cv2.convertScaleAbs(estimate[iy:iy + y1 - y0, ix:ix + x1 - x0], alpha=255.0)
    return out


def _fusion_estimate(image: np.ndarray, fg: np.ndarray, bg: np.ndarray, alpha3: np.ndarray) -> np.ndarray:
    """F = Fb + a (I - Bb - a (Fb - Bb)), clipped to [0, 1]; (h, w, 3) float32 each."""
    estimate = cv2.multiply(cv2.subtract(fg, bg), alpha3)
    estimate = cv2.multiply(cv2.subtract(cv2.subtract(image, estimate), bg), alpha3)
    estimate = cv2.add(estimate, fg)
    return np.clip(estimate, 0.0, 1.0, out=estimate)


def _tiles_with(flags: np.ndarray) -> list[tuple[int, int, int, int]]:
    """(y0, y1, x0, x1) of the _TILE-square tiles holding a nonzero flag, horizontal runs merged."""
    height, width = flags.shape
    rows, cols = -(-height // _TILE), -(-width // _TILE)
    padded = np.zeros((rows * _TILE, cols * _TILE), dtype=np.uint8)
    padded[:height, :width] = flags
    hit = padded.reshape(rows, _TILE, cols, _TILE).max(axis=(1, 3)) > 0
    tiles = []
    for row in range(rows):
        cols_hit = np.flatnonzero(hit[row])
        if not cols_hit.size:
            continue
        runs = np.split(cols_hit, np.flatnonzero(np.diff(cols_hit) > 1) + 1)
        for run in runs:
            tiles.append((row * _TILE, min(height, (row + 1) * _TILE),
                          int(run[0]) * _TILE, min(width, (int(run[-1]) + 1) * _TILE)))
    return tiles


def _tiles_bounds(tiles: list[tuple[int, int, int, int]]) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of the rectangle that holds every tile."""
    return (min(t[0] for t in tiles), max(t[1] for t in tiles), min(t[2] for t in tiles), max(t[3] for t in tiles))


def _field_window(start: int, stop: int, size: int, margin: int, factor: int) -> tuple[int, int]:
    """[start, stop) widened by `margin` on one axis of length `size`, with ends on the shrink grid
    (multiples of `factor` from 0) unless they reach the image's edge, so shrunk blocks stay the same."""
    low = max(0, (start - margin) // factor * factor)
    high = stop + margin
    high = size if high >= size else min(size, -(-high // factor) * factor)
    return low, high


def _wide_pass_fields(rgb: np.ndarray, alpha8: np.ndarray, box: int, bounds: tuple[int, int, int, int],
                      halo: int) -> tuple[np.ndarray, np.ndarray, int, int, int]:
    """The first pass's blurred foreground and background colour fields (Fb, Bb) on a copy shrunk by an
    integer factor so the box is about `_WIDE_PASS_BOX` pixels: float32 (h, w, 3) each, the factor, and
    the full-size (y, x) origin of the fields.

    Only a window around `bounds` (the tiles, each widened by `halo`) is computed: wide enough that every
    sample and every box window of a sample lies inside it, so the values there are those the whole image
    gives (the window's edges sit on the shrink grid) while the work follows the soft edges' extent."""
    factor = max(1, round(box / _WIDE_PASS_BOX))
    small_box = max(1, round(box / factor))
    margin = halo + factor * (small_box // 2 + 2)
    full_height, full_width = alpha8.shape
    y0, y1 = _field_window(bounds[0], bounds[1], full_height, margin, factor)
    x0, x1 = _field_window(bounds[2], bounds[3], full_width, margin, factor)
    rgb, alpha8 = rgb[y0:y1, x0:x1], alpha8[y0:y1, x0:x1]
    height, width = alpha8.shape
    pad_y, pad_x = -height % factor, -width % factor  # whole blocks: OpenCV's fast integer INTER_AREA
    premultiplied = cv2.multiply(rgb, cv2.merge([alpha8, alpha8, alpha8]), scale=1 / 255)  # I * a, uint8
    planes = []
    for plane in (rgb, premultiplied, alpha8):
        if pad_y or pad_x:
            plane = cv2.copyMakeBorder(plane, 0, pad_y, 0, pad_x, cv2.BORDER_REPLICATE)
        size = (plane.shape[1] // factor, plane.shape[0] // factor)
        small = cv2.resize(plane, size, interpolation=cv2.INTER_AREA) if factor > 1 else plane
        planes.append(small.astype(np.float32) * np.float32(1 / 255))
    image, fg, alpha = planes
    bg = image - fg  # I * (1 - a)
    blurred_alpha = cv2.blur(alpha, (small_box, small_box))[..., None]
    fg_field = cv2.blur(fg, (small_box, small_box)) / (blurred_alpha + _EPS)
    bg_field = cv2.blur(bg, (small_box, small_box)) / ((1 + _EPS) - blurred_alpha)
    return fg_field, bg_field, factor, y0, x0


def _sample_fields(fields: tuple[np.ndarray, np.ndarray, int, int, int],
                   region: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear samples of the small fields at the full-size pixel centres of `region`
    (small pixel j is the mean of full-size pixels origin + j*f .. origin + j*f + f - 1)."""
    fg, bg, factor, origin_y, origin_x = fields
    y0, y1, x0, x1 = region
    scale = 1 / factor
    # dst (x, y) samples src (x / f + ox, y / f + oy): the pixel-centre mapping, as an affine warp
    inverse = np.array([[scale, 0.0, (x0 - origin_x + 0.5) * scale - 0.5],
                        [0.0, scale, (y0 - origin_y + 0.5) * scale - 0.5]])
    size = (x1 - x0, y1 - y0)
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    return (cv2.warpAffine(fg, inverse, size, flags=flags, borderMode=cv2.BORDER_REPLICATE),
            cv2.warpAffine(bg, inverse, size, flags=flags, borderMode=cv2.BORDER_REPLICATE))


# --- Composition and PNG ---


def rgba_array(rgb: np.ndarray, alpha8: np.ndarray) -> np.ndarray:
    """(H, W, 3) + (H, W) uint8 -> (H, W, 4) uint8."""
    return cv2.merge([rgb[..., 0], rgb[..., 1], rgb[..., 2], alpha8])


def _chunk(kind: bytes, payload: bytes | bytearray) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(payload, zlib.crc32(kind)))


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
