"""Foreground colour refinement (Forte & Pitie 2021, "Approximate Fast Foreground Colour Estimation"):
blur fusion in two passes, a wide one (box 90) for smooth foreground and background colour fields, then a
narrow one (box 6) seeded with them; it removes the old background's colour bleeding into hair and soft
edges. Used by the output stage (worker.pipeline.render).

* CPU, `refine_colours`: OpenCV in the job's thread, off the GIL. Only 32-pixel tiles that hold partly
  transparent pixels run the full computation; opaque pixels keep their colour and transparent ones
  become black (what the full computation gives there too). The wide pass runs on a copy shrunk so its
  box is about 30 pixels (its fields are smooth), and only around the soft edges.
* Device, `refine_foreground`: torch on the mask's device (CUDA), cumulative-sum box blurs.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from worker.pipeline.postprocess import to_alpha8

REFINE_RADII = (90, 6)  # box sizes of the two blur-fusion passes
_EPS = 1e-5
_TILE = 32  # refine tiles (horizontal runs of them are merged, which keeps Python overhead small)
_WIDE_PASS_BOX = 30  # the 90-box pass runs at 1/3 scale (box 30); its fields are smooth


# --- CPU ---


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
    alpha8 = to_alpha8(mask) if alpha8 is None else alpha8
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
        ry0, ry1, rx0, rx1 = (
            max(0, y0 - halo),
            min(height, y1 + halo),
            max(0, x0 - halo),
            min(width, x1 + halo),
        )
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
        out[y0:y1, x0:x1] = cv2.convertScaleAbs(estimate[iy : iy + y1 - y0, ix : ix + x1 - x0], alpha=255.0)
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
            tiles.append(
                (
                    row * _TILE,
                    min(height, (row + 1) * _TILE),
                    int(run[0]) * _TILE,
                    min(width, (int(run[-1]) + 1) * _TILE),
                )
            )
    return tiles


def _tiles_bounds(tiles: list[tuple[int, int, int, int]]) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of the rectangle that holds every tile."""
    return (
        min(t[0] for t in tiles),
        max(t[1] for t in tiles),
        min(t[2] for t in tiles),
        max(t[3] for t in tiles),
    )


def _field_window(start: int, stop: int, size: int, margin: int, factor: int) -> tuple[int, int]:
    """[start, stop) widened by `margin` on one axis of length `size`, with ends on the shrink grid
    (multiples of `factor` from 0) unless they reach the image's edge, so shrunk blocks stay the same."""
    low = max(0, (start - margin) // factor * factor)
    high = stop + margin
    high = size if high >= size else min(size, -(-high // factor) * factor)
    return low, high


def _wide_pass_fields(
    rgb: np.ndarray, alpha8: np.ndarray, box: int, bounds: tuple[int, int, int, int], halo: int
) -> tuple[np.ndarray, np.ndarray, int, int, int]:
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


def _sample_fields(
    fields: tuple[np.ndarray, np.ndarray, int, int, int], region: tuple[int, int, int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear samples of the small fields at the full-size pixel centres of `region`
    (small pixel j is the mean of full-size pixels origin + j*f .. origin + j*f + f - 1)."""
    fg, bg, factor, origin_y, origin_x = fields
    y0, y1, x0, x1 = region
    scale = 1 / factor
    # dst (x, y) samples src (x / f + ox, y / f + oy): the pixel-centre mapping, as an affine warp
    inverse = np.array(
        [[scale, 0.0, (x0 - origin_x + 0.5) * scale - 0.5], [0.0, scale, (y0 - origin_y + 0.5) * scale - 0.5]]
    )
    size = (x1 - x0, y1 - y0)
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    return (
        cv2.warpAffine(fg, inverse, size, flags=flags, borderMode=cv2.BORDER_REPLICATE),
        cv2.warpAffine(bg, inverse, size, flags=flags, borderMode=cv2.BORDER_REPLICATE),
    )


# --- Device ---


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
            *x.shape[:-2], height + size - 1, width + size - 1
        )
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
        torch.sub(
            sums.narrow(dim, size, length - 1),
            sums.narrow(dim, 0, length - 1),
            out=out.narrow(dim, 1, length - 1),
        )
    return out.div_(size)  # per axis, so the next cumsum stays small (float32 precision)


def _blur_fusion_step(
    image: torch.Tensor, foreground: torch.Tensor, background: torch.Tensor, alpha: torch.Tensor, radius: int
) -> tuple[torch.Tensor, torch.Tensor]:
    eps = 1e-5
    blurred_alpha = box_blur(alpha, radius)
    blurred_fg = box_blur(foreground * alpha, radius).div_(blurred_alpha + eps)
    blurred_bg = box_blur(background * (1 - alpha), radius).div_((1 + eps) - blurred_alpha)
    # F = Fb + a * (I - a*Fb - (1-a)*Bb) = Fb + a * (I - Bb - a*(Fb - Bb)), computed in place
    # because full-size temporaries dominate the cost on CPU.
    estimate = torch.sub(blurred_fg, blurred_bg).mul_(alpha).neg_().add_(image).sub_(blurred_bg)
    estimate.mul_(alpha).add_(blurred_fg).clamp_(0, 1)
    return estimate, blurred_bg


def refine_foreground(
    image: torch.Tensor, mask: torch.Tensor, *, radii: tuple[int, int] = (90, 6)
) -> torch.Tensor:
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
