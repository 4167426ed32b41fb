"""Decoding: bytes -> (H, W, 3) uint8 RGB, EXIF orientation applied, with size guards (`decode_rgb`, the one
decoder of inputs and backgrounds), and the kept masks' PNGs.

A plain baseline/progressive JPEG within the limits goes through libjpeg-turbo (simplejpeg); everything
else through Pillow (`decode_image`), which handles every format and failure and gives the same pixels.
"""

from __future__ import annotations

import io
import re
import warnings

import numpy as np
import simplejpeg
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from common.domain.errors import ImageLoadError, ImageTooLargeError, ImageTooSmallError

# Formats we open. Restricting the list keeps Pillow away from plugins that shell out
# (EPS runs Ghostscript) or that nobody sends as a photo. JPEG includes MPO (many phone cameras).
INPUT_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")
MIN_SIDE = 8  # smaller inputs carry no usable subject; refuse them rather than return noise

_SRGB_PROFILE = ImageCms.createProfile("sRGB")

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
    `decode_image`, which handles every case the fast JPEG path does not take."""
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
            if (
                header.format != "JPEG"
                or header.mode not in ("RGB", "L")
                or header.info.get("icc_profile")
                or width * height > max_pixels
                or max(width, height) > max_side
                or min(width, height) < min_side
            ):
                return None
            orientation = header.getexif().get(0x0112, 1)
        rgb = simplejpeg.decode_jpeg(data, colorspace="RGB")
    except Exception:  # noqa: BLE001 - the general decoder reports the file's problem properly
        return None
    if rgb.shape[:2] != (height, width):
        return None
    transform = _ORIENT.get(orientation)
    return np.ascontiguousarray(transform(rgb)) if transform else rgb


# --- The general decoder (Pillow) ---


def decode_image(data: bytes, *, max_pixels: int, max_side: int, min_side: int = MIN_SIDE) -> Image.Image:
    """Decode an uploaded image to 8-bit RGB with its EXIF orientation applied.

    * Palette (incl. transparency), CMYK, grey, 1-bit, 16-bit (I;16, I) and float inputs become RGB.
      Embedded ICC profiles are converted to sRGB (best effort; the naive conversion otherwise).
    * Alpha (LA, RGBA, PA, transparent palettes) is dropped: the network sees the stored colours,
      as the reference pipeline's `convert("RGB")` does. The cut-out's alpha is the predicted mask.
    * Animated GIF / WebP / multi-page TIFF: the first frame.
    * The declared width x height is checked against `max_pixels` and each side against `max_side`
      (the worker passes its `max_input_side` setting) before any pixel is decoded (decompression bombs).
    * Whatever else goes wrong inside a decoder is an `ImageLoadError`, never a crash: a bad file
      must end its job with a clear error, not be retried as a worker failure.
    """
    if not data:
        raise ImageLoadError("the image file is empty")
    _raise_pillow_limit(max_pixels)
    try:
        # We check the declared size ourselves right after, so Pillow's bomb *warning* is noise;
        # its hard error (2x MAX_IMAGE_PIXELS) is kept above our limit by `_raise_pillow_limit`.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=INPUT_FORMATS)
    except UnidentifiedImageError:
        raise ImageLoadError(f"not a supported image (expected one of {', '.join(INPUT_FORMATS)})") from None
    except Image.DecompressionBombError as exc:
        raise _bomb_error(exc, max_pixels) from None
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure is the file's fault
        raise ImageLoadError(f"cannot read the image: {exc or type(exc).__name__}") from None

    with image:
        width, height = image.size
        if width * height > max_pixels:
            raise ImageTooLargeError(
                f"image is {width}x{height} ({width * height:,} pixels); the limit is {max_pixels:,} pixels"
            )
        if max(width, height) > max_side:
            raise ImageTooLargeError(f"image is {width}x{height}; neither side may exceed {max_side} pixels")
        if min(width, height) < min_side:
            raise ImageTooSmallError(
                f"image is {width}x{height}; both sides must be at least {min_side} pixels"
            )
        try:
            image.load()  # first frame only: we never seek
            rgb = _to_rgb(_oriented(image))
        except Image.DecompressionBombError as exc:
            raise _bomb_error(exc, max_pixels) from None
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - truncated/corrupt data surfaces as many exception types
            # Pillow reports truncated data as OSError("image file is truncated ...").
            raise ImageLoadError(
                f"cannot decode the image ({image.format or 'unknown format'}): {exc or type(exc).__name__}"
            ) from None
    return rgb


def _bomb_error(exc: Image.DecompressionBombError, max_pixels: int) -> ImageTooLargeError:
    """Pillow's own hard limit fired (declared size far beyond ours): say it in our terms."""
    declared = re.search(r"\((\d+) pixels\)", str(exc))
    size = f"declares {int(declared.group(1)):,} pixels" if declared else "declares too many pixels"
    return ImageTooLargeError(f"image is too large to decode: it {size}; the limit is {max_pixels:,} pixels")


def _oriented(image: Image.Image) -> Image.Image:
    """EXIF orientation applied; a corrupt EXIF block leaves the image as stored rather than failing."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - EXIF parsing raises anything from struct.error to KeyError
        return image.copy()  # a copy: the caller closes the decoded original


def _raise_pillow_limit(max_pixels: int) -> None:
    """Keep Pillow's global bomb limit at or above ours, so our clearer check decides first."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and limit < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        image = _high_depth_to_l(image)
        mode = "L"
    if mode == "P":
        # Going through RGBA keeps `transparency` handling inside Pillow; the alpha is then dropped.
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode == "CMYK" or image.info.get("icc_profile"):
        converted = _icc_to_srgb(image)
        if converted is not None:
            return converted
    return image if image.mode == "RGB" else image.convert("RGB")


def _high_depth_to_l(image: Image.Image) -> Image.Image:
    """16-bit / 32-bit integer and float grey -> 8-bit L, scaled rather than clipped."""
    values = np.asarray(image).astype(np.float32)  # the one full-size temporary; the rest is in place
    peak = float(values.max()) if values.size else 0.0
    if image.mode == "F" and peak <= 1.0:
        scale = 255.0
    elif peak <= 255.0:
        scale = 1.0
    elif peak <= 65535.0:
        scale = 255.0 / 65535.0
    else:
        scale = 255.0 / peak
    values *= scale
    np.rint(values, out=values)
    np.clip(values, 0, 255, out=values)
    return Image.fromarray(values.astype(np.uint8), "L")


def _icc_to_srgb(image: Image.Image) -> Image.Image | None:
    """Embedded ICC profile -> sRGB RGB, or None to fall back on Pillow's plain conversion."""
    profile_bytes = image.info.get("icc_profile")
    if not profile_bytes or image.mode not in ("RGB", "RGBA", "CMYK", "L", "LA"):
        return None
    source = image.convert("RGB") if image.mode in ("RGBA", "LA") else image
    if source.mode == "L":
        source = source.convert("RGB")
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(profile_bytes))
        return ImageCms.profileToProfile(source, profile, _SRGB_PROFILE, outputMode="RGB")
    except (ImageCms.PyCMSError, OSError, ValueError):
        return None


# --- Kept masks ---


def read_mask_png(data: bytes) -> np.ndarray:
    """A kept mask's PNG -> (H, W) uint8."""
    with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
        return np.asarray(image.convert("L"), dtype=np.uint8)
