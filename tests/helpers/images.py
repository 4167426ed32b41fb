"""Pictures the tests send: small PNGs made on the spot, and data URIs of them."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

Color = tuple[int, int, int]
Box = tuple[int, int, int, int]


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def boxed_png(
    size: tuple[int, int], color: Color, box: Box | None = None, box_color: Color | None = None
) -> bytes:
    """An RGB picture of one colour, with an optional rectangle of another: every factory below is one."""
    image = Image.new("RGB", size, color)
    if box is not None and box_color is not None:
        image.paste(box_color, box)
    return encode_png(image)


def png_bytes(size: tuple[int, int] = (64, 48), color: Color = (200, 30, 30)) -> bytes:
    """A red picture with a green square in the middle half (the gateway tests' default input)."""
    width, height = size
    return boxed_png(size, color, (width // 4, height // 4, width * 3 // 4, height * 3 // 4), (20, 200, 20))


def array_png(array: np.ndarray) -> bytes:
    """These pixels (H x W x 3 uint8, or H x W) as a PNG."""
    return encode_png(Image.fromarray(array))


def small_png(seed: int) -> bytes:
    """A distinct small picture per job (a square on a background), a few hundred bytes."""
    color = ((seed * 37) % 256, (seed * 91) % 256, (seed * 53) % 256)
    inverse = (255 - color[0], 255 - color[1], 255 - color[2])
    return boxed_png((96 + seed % 17, 64 + seed % 13), color, (20, 16, 60, 48), inverse)


def flat_png(side: int) -> bytes:
    """A big, almost uniform picture: a few tens of KB to upload, `side`² pixels to hold in memory."""
    return boxed_png(
        (side, side), (20, 160, 40), (side // 4, side // 4, side * 3 // 4, side * 3 // 4), (230, 230, 230)
    )


def marker_png(width: int, height: int = 40) -> bytes:
    """A small plain picture whose width selects a forward-hook rule (tests/forward_hook.py)."""
    return boxed_png((width, height), (200, 40, 90))


def tiny_png() -> bytes:
    """16x16, plain red: the smallest valid input."""
    return boxed_png((16, 16), (200, 30, 30))


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"
