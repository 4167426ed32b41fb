"""Image decoding, foreground colour refinement, cut-out composition and output encoding.

Everything the worker does to pixels outside the network itself:

* `decode_image`: bytes -> RGB `PIL.Image`, EXIF orientation applied, with size guards.
* `refine_foreground`: blur-fusion foreground colour estimate (torch; CPU or CUDA).
* `compose_cutout` / `mask_to_image`: RGBA cut-out and 8-bit mask at the input's size.
* `encode_image`: PNG / WebP / GIF bytes plus the fields fal's `ImageFile` carries.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from common.domain.errors import ImageLoadError, ImageTooLargeError, ImageTooSmallError

# Formats we open. Restricting the list keeps Pillow away from plugins that shell out
# (EPS runs Ghostscript) or that nobody sends as a photo. JPEG includes MPO (many phone cameras).
INPUT_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")
OUTPUT_FORMATS: tuple[str, ...] = ("png", "webp", "gif")
MIN_SIDE = 8  # smaller inputs carry no usable subject; refuse them rather than return noise

_CONTENT_TYPES = {"png": "image/png", "webp": "image/webp", "gif": "image/gif"}
_SRGB_PROFILE = ImageCms.createProfile("sRGB")

# --- Decoding ---


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
            raise ImageTooLargeError(f"image is {width}x{height} ({width * height:,} pixels); "
                                     f"the limit is {max_pixels:,} pixels")
        if max(width, height) > max_side:
            raise ImageTooLargeError(f"image is {width}x{height}; neither side may exceed {max_side} pixels")
        if min(width, height) < min_side:
            raise ImageTooSmallError(f"image is {width}x{height}; both sides must be at least {min_side} pixels")
        try:
            image.load()  # first frame only: we never seek
            rgb = _to_rgb(_oriented(image))
        except Image.DecompressionBombError as exc:
            raise _bomb_error(exc, max_pixels) from None
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - truncated/corrupt data surfaces as many exception types
            # Pillow reports truncated data as OSError("image file is truncated ...").
            raise ImageLoadError(f"cannot decode the image ({image.format or 'unknown format'}): "
                                 f"{exc or type(exc).__name__}") from None
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


# --- Foreground colour refinement (Forte & Pitié 2021, "Approximate Fast Foreground Colour Estimation") ---


def _reflect_indices(length: int, before: int, after: int, device: torch.device) -> torch.Tensor:
    """Indices that pad an axis by mirroring without repeating the edge (OpenCV REFLECT_101),
    for any pad width, even wider than the axis itself."""
    index = torch.arange(-before, length + after, device=device)
    if length == 1:
        return torch.zeros_like(index)
    period = 2 * (length - 1)
    index = index.remainder(period)
    return torch.where(index >= length, period - index, index)


def box_blur(x: torch.Tensor, size: int) -> torch.Tensor:
    """Mean over a size x size window of the last two axes, like `cv2.blur(x, (size, size))`:
    window anchored at size // 2, REFLECT_101 borders. Separable, via cumulative sums, so the
    cost does not grow with `size`."""
    if size <= 1:
        return x
    before, after = size // 2, size - 1 - size // 2
    height, width = x.shape[-2:]
    if max(before, after) < min(height, width):
        flat = x.reshape(1, -1, height, width)  # F.pad's reflect mode is REFLECT_101, and fast
        padded = F.pad(flat, (before, after, before, after), mode="reflect").reshape(
            *x.shape[:-2], height + size - 1, width + size - 1)
    else:  # pads wider than the image: mirror repeatedly, by index
        padded = x.index_select(-2, _reflect_indices(height, before, after, x.device))
        padded = padded.index_select(-1, _reflect_indices(width, before, after, x.device))
    return _window_mean(_window_mean(padded, x.dim() - 2, size, height), x.dim() - 1, size, width)


def _window_mean(padded: torch.Tensor, dim: int, size: int, length: int) -> torch.Tensor:
    """Means of the `length` windows of `size` along `dim` of an axis padded by size - 1.
    Window i is sums[i + size - 1] - sums[i - 1]. Few full-size passes on purpose: on the CPU
    this is memory-bound. Consumes `padded` (cumsum in place)."""
    sums = padded.cumsum_(dim)
    shape = list(sums.shape)
    shape[dim] = length
    out = sums.new_empty(shape)
    out.narrow(dim, 0, 1).copy_(sums.narrow(dim, size - 1, 1))
    if length > 1:
        torch.sub(sums.narrow(dim, size, length - 1), sums.narrow(dim, 0, length - 1),
                  out=out.narrow(dim, 1, length - 1))
    return out.div_(size)  # per axis, so the next cumsum stays small (float32 precision)


def _blur_fusion_step(image: torch.Tensor, foreground: torch.Tensor, background: torch.Tensor,
                      alpha: torch.Tensor, radius: int) -> tuple[torch.Tensor, torch.Tensor]:
    eps = 1e-5
    blurred_alpha = box_blur(alpha, radius)
    blurred_fg = box_blur(foreground * alpha, radius).div_(blurred_alpha + eps)
    blurred_bg = box_blur(background * (1 - alpha), radius).div_((1 + eps) - blurred_alpha)
    # F = Fb + a * (I - a*Fb - (1-a)*Bb) = Fb + a * (I - Bb - a*(Fb - Bb)), computed in place
    # because full-size temporaries dominate the cost on CPU.
    estimate = torch.sub(blurred_fg, blurred_bg).mul_(alpha).neg_().add_(image).sub_(blurred_bg)
    estimate.mul_(alpha).add_(blurred_fg).clamp_(0, 1)
    return estimate, blurred_bg


def refine_foreground(image: torch.Tensor, mask: torch.Tensor, *, radii: tuple[int, int] = (90, 6)) -> torch.Tensor:
    """Estimate the foreground colours under a soft mask (blur fusion, two passes).

    `image` (3, H, W) float in [0, 1], `mask` (H, W) or (1, H, W) in [0, 1], on the same device
    (CUDA works). Returns the estimated foreground (3, H, W) in [0, 1]. The first pass uses a
    large radius to get smooth foreground and background colour fields, the second a small one
    seeded with the first pass's estimates; this removes the old background's colour that
    bleeds into hair and soft edges.
    """
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be (3, H, W), got {tuple(image.shape)}")
    alpha = mask.reshape(1, *image.shape[-2:]).to(image.dtype)
    large, small = radii
    foreground, background = _blur_fusion_step(image, image, image, alpha, large)
    foreground, _ = _blur_fusion_step(image, foreground, background, alpha, small)
    return foreground


# --- Composition ---


def mask_to_image(mask: np.ndarray) -> Image.Image:
    """Float mask in [0, 1] (H, W) -> 8-bit greyscale ("L") image."""
    return Image.fromarray(_mask_to_uint8(mask), "L")


def _mask_to_uint8(mask: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.asarray(mask, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)


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
    rgba[..., 3] = _mask_to_uint8(mask)
    return Image.fromarray(rgba, "RGBA")


def compose_cutout(image: Image.Image, mask: np.ndarray, *, refine: bool = True,
                   device: torch.device | str = "cpu") -> Image.Image:
    """RGBA cut-out at the input's size: colours (refined or as decoded) plus the mask as alpha."""
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {image.mode}")
    if mask.shape != (image.height, image.width):
        raise ValueError(f"mask is {mask.shape[1]}x{mask.shape[0]}, image is {image.width}x{image.height}")
    rgb = refined_colours(image, mask, device) if refine else np.asarray(image)
    return rgba_from(rgb, mask)


# --- Encoding ---


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


def encode_image(image: Image.Image, fmt: str, *, png_compress_level: int = 6, webp_quality: int = 90,
                 lossless: bool = False) -> EncodedImage:
    """Encode an RGBA cut-out or an L mask as png, webp or gif.

    * png: lossless, the mode is kept (RGBA or 8-bit L).
    * webp: lossy colour at `webp_quality` with lossless alpha, or fully lossless (`lossless`,
      used for masks). WebP has no greyscale mode: an L mask is stored as grey RGB.
    * gif: 256 colours and 1-bit transparency. RGBA is quantised to 255 colours, and pixels with
      alpha < 128 take the reserved transparent index 255. An L mask is stored as grey levels.
    """
    fmt = fmt.lower()
    if fmt not in OUTPUT_FORMATS:
        raise ValueError(f"unsupported output format {fmt!r}; expected one of {OUTPUT_FORMATS}")
    buffer = io.BytesIO()
    if fmt == "png":
        image.save(buffer, format="PNG", compress_level=png_compress_level)
    elif fmt == "webp":
        if lossless:
            image.save(buffer, format="WEBP", lossless=True, quality=100, method=4)
        else:
            image.save(buffer, format="WEBP", quality=webp_quality, alpha_quality=100, method=4)
    else:
        options = {"transparency": _GIF_TRANSPARENT_INDEX} if image.mode == "RGBA" else {}
        _gif_ready(image).save(buffer, format="GIF", **options)
    return EncodedImage(data=buffer.getvalue(), content_type=_CONTENT_TYPES[fmt], extension=f".{fmt}",
                        width=image.width, height=image.height)


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
