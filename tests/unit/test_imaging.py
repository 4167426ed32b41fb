"""worker.pipeline's decoding guards and modes, blur-fusion refinement (torch), and the reference composition
and encoders (bench/reference_paths.py)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms
from skimage import data

from bench.reference_paths import compose_cutout, encode_image, mask_to_image
from common.domain.errors import ImageLoadError, ImageTooLargeError, ImageTooSmallError
from worker.pipeline.decode import decode_image
from worker.pipeline.refine import box_blur, refine_foreground

MAX_PIXELS = 10_000_000
MAX_SIDE = 16383  # the max_input_side default


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    return Image.fromarray(data.astronaut())


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def grey(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L"))


# --------------------------------------------------------------------------------------------
# decode_image: modes
# --------------------------------------------------------------------------------------------


def _sixteen_bit(image: Image.Image) -> Image.Image:
    return Image.fromarray(grey(image).astype(np.uint16) * 257)  # mode I;16


@pytest.mark.parametrize(
    ("name", "make", "fmt", "options"),
    [
        ("palette", lambda im: im.convert("P"), "PNG", {}),
        ("palette-transparency", lambda im: im.convert("P"), "GIF", {"transparency": 0}),
        ("grey", lambda im: im.convert("L"), "PNG", {}),
        ("1-bit", lambda im: im.convert("1"), "PNG", {}),
        ("cmyk-jpeg", lambda im: im.convert("CMYK"), "JPEG", {}),
        ("cmyk-tiff", lambda im: im.convert("CMYK"), "TIFF", {}),
        ("grey-alpha", lambda im: im.convert("LA"), "PNG", {}),
        ("rgba-png", lambda im: im.convert("RGBA"), "PNG", {}),
        ("rgba-webp", lambda im: im.convert("RGBA"), "WEBP", {"lossless": True}),
        ("16-bit", _sixteen_bit, "PNG", {}),
        ("32-bit-int", lambda im: Image.fromarray(grey(im).astype(np.int32) * 257), "TIFF", {}),
        ("float", lambda im: Image.fromarray(grey(im).astype(np.float32) / 255), "TIFF", {}),
        ("bmp", lambda im: im, "BMP", {}),
    ],
)
def test_decodes_every_mode_to_rgb(astronaut, name, make, fmt, options):
    source = make(astronaut)
    decoded = decode_image(encode(source, fmt, **options), max_pixels=MAX_PIXELS, max_side=MAX_SIDE)
    assert decoded.mode == "RGB"
    assert decoded.size == astronaut.size
    if source.mode in ("L", "LA", "1", "I;16", "I", "F"):
        pixels = np.asarray(decoded)
        assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    if name in ("16-bit", "32-bit-int", "float", "grey"):
        # Deep images are scaled to 8 bits, not clipped: the grey levels survive.
        assert np.abs(np.asarray(decoded)[..., 0].astype(int) - grey(astronaut)).max() <= 1


def test_alpha_is_dropped_keeping_stored_colours(astronaut):
    rgba = astronaut.convert("RGBA")
    rgba.putalpha(0)  # fully transparent: the colours are still there
    decoded = decode_image(encode(rgba, "PNG"), max_pixels=MAX_PIXELS, max_side=MAX_SIDE)
    assert np.array_equal(np.asarray(decoded), np.asarray(astronaut))


def test_exif_orientation_is_applied():
    stored = np.zeros((20, 40, 3), dtype=np.uint8)  # 40 wide, 20 high
    stored[:5, :5] = (255, 0, 0)  # red in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data_ = encode(Image.fromarray(stored), "PNG", exif=exif.tobytes())
    decoded = decode_image(data_, max_pixels=MAX_PIXELS, max_side=MAX_SIDE)
    assert decoded.size == (20, 40)
    pixels = np.asarray(decoded).astype(int)
    assert pixels[2, -3, 0] > 200 and pixels[2, -3, 1] < 50  # stored top-left -> displayed top-right


def test_animated_gif_and_webp_give_the_first_frame():
    frames = [Image.new("RGB", (32, 24), colour) for colour in ((250, 0, 0), (0, 250, 0), (0, 0, 250))]
    for fmt in ("GIF", "WEBP"):
        data_ = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, loop=0)
        assert getattr(Image.open(io.BytesIO(data_)), "n_frames", 1) == 3
        decoded = np.asarray(decode_image(data_, max_pixels=MAX_PIXELS, max_side=MAX_SIDE)).astype(int)
        assert decoded[..., 0].mean() > 200 and decoded[..., 1].mean() < 30, fmt


def test_icc_profile_is_converted_to_srgb(astronaut):
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    decoded = decode_image(
        encode(astronaut, "PNG", icc_profile=srgb), max_pixels=MAX_PIXELS, max_side=MAX_SIDE
    )
    # sRGB -> sRGB changes (almost) nothing, but the path through LittleCMS ran.
    assert np.abs(np.asarray(decoded).astype(int) - np.asarray(astronaut)).max() <= 2


# --------------------------------------------------------------------------------------------
# decode_image: guards
# --------------------------------------------------------------------------------------------


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height but holds almost no data (a decompression bomb)."""
    real = bytearray(encode(Image.new("RGB", (8, 8)), "PNG"))
    ihdr = bytes(real[12:16]) + struct.pack(">II", width, height) + bytes(real[24:29])
    real[16:24] = struct.pack(">II", width, height)
    real[29:33] = struct.pack(">I", zlib.crc32(ihdr) & 0xFFFFFFFF)
    return bytes(real)


def test_declared_size_over_the_limit_is_refused_before_decoding():
    with pytest.raises(ImageTooLargeError, match="10000x10000"):
        decode_image(png_claiming(10_000, 10_000), max_pixels=64_000_000, max_side=MAX_SIDE)


def test_size_beyond_pillows_own_bomb_limit_is_too_large_not_a_crash():
    with pytest.raises(ImageTooLargeError):
        decode_image(png_claiming(100_000, 100_000), max_pixels=64_000_000, max_side=MAX_SIDE)


def test_limit_above_pillows_default_is_honoured(astronaut, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    # A generous limit must not be undercut by Pillow's global MAX_IMAGE_PIXELS.
    decode_image(encode(astronaut, "PNG"), max_pixels=500_000_000, max_side=MAX_SIDE)
    assert Image.MAX_IMAGE_PIXELS is None or Image.MAX_IMAGE_PIXELS >= 500_000_000


def test_small_limit_refuses_a_normal_photo(astronaut):
    with pytest.raises(ImageTooLargeError, match="512x512"):
        decode_image(encode(astronaut, "JPEG"), max_pixels=100_000, max_side=MAX_SIDE)


def test_truncated_file_is_a_load_error(astronaut):
    data_ = encode(astronaut, "JPEG", quality=90)
    with pytest.raises(ImageLoadError, match="truncated"):
        decode_image(data_[: len(data_) // 2], max_pixels=MAX_PIXELS, max_side=MAX_SIDE)


@pytest.mark.parametrize(
    "payload",
    [b"", b"definitely not an image", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"],
    ids=["empty", "garbage", "eps-not-accepted"],
)
def test_unreadable_inputs_are_load_errors(payload):
    with pytest.raises(ImageLoadError):
        decode_image(payload, max_pixels=MAX_PIXELS, max_side=MAX_SIDE)


def test_tiny_image_is_too_small():
    with pytest.raises(ImageTooSmallError, match="4x4"):
        decode_image(encode(Image.new("RGB", (4, 4)), "PNG"), max_pixels=MAX_PIXELS, max_side=MAX_SIDE)


# --------------------------------------------------------------------------------------------
# Box blur and foreground refinement
# --------------------------------------------------------------------------------------------


def box_blur_reference(x: np.ndarray, size: int) -> np.ndarray:
    """cv2.blur semantics by brute force: window anchored at size // 2, REFLECT_101 borders."""
    before, after = size // 2, size - 1 - size // 2
    padded = np.pad(x, ((before, after), (before, after)), mode="reflect")
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            out[i, j] = padded[i : i + size, j : j + size].mean()
    return out


@pytest.mark.parametrize(("shape", "size"), [((17, 23), 6), ((20, 13), 90), ((1, 9), 4), ((12, 30), 5)])
def test_box_blur_matches_opencv_semantics(shape, size):
    x = np.random.default_rng(0).random(shape)
    got = box_blur(torch.from_numpy(x)[None], size)[0].numpy()
    np.testing.assert_allclose(got, box_blur_reference(x, size), atol=1e-9)


def blur_fusion_reference(image: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """The published algorithm in float64 numpy, straight from the paper's equations."""

    def blur(x, r):  # per channel
        return np.stack([box_blur_reference(x[..., c], r) for c in range(x.shape[-1])], axis=-1)

    def step(F, B, a, r):
        blurred_a = blur(a, r)
        blurred_F = blur(F * a, r) / (blurred_a + 1e-5)
        blurred_B = blur(B * (1 - a), r) / ((1 - blurred_a) + 1e-5)
        return np.clip(blurred_F + a * (image - a * blurred_F - (1 - a) * blurred_B), 0, 1), blurred_B

    a = alpha[..., None]
    F, B = step(image, image, a, 90)
    return step(F, B, a, 6)[0]


def test_refine_foreground_matches_the_published_algorithm():
    rng = np.random.default_rng(1)
    image, alpha = rng.random((24, 31, 3)), rng.random((24, 31))
    got = refine_foreground(torch.from_numpy(image).permute(2, 0, 1).float(), torch.from_numpy(alpha).float())
    np.testing.assert_allclose(got.permute(1, 2, 0).numpy(), blur_fusion_reference(image, alpha), atol=1e-4)


def soft_composite(height: int = 64, width: int = 96):
    """Red foreground over green background with a soft vertical edge."""
    alpha = np.clip((np.arange(width) - 30) / 36.0, 0, 1)[None, :].repeat(height, 0).astype(np.float32)
    fg, bg = np.array([0.9, 0.1, 0.1], np.float32), np.array([0.1, 0.8, 0.1], np.float32)
    image = alpha[..., None] * fg + (1 - alpha[..., None]) * bg
    return image, alpha, fg


def test_refine_foreground_removes_background_bleed_in_soft_edges():
    image, alpha, fg = soft_composite()
    refined = refine_foreground(torch.from_numpy(image).permute(2, 0, 1), torch.from_numpy(alpha))
    refined = refined.permute(1, 2, 0).numpy()
    soft = (alpha > 0.15) & (alpha < 0.85)
    error_before = np.abs(image[soft] - fg).mean()
    error_after = np.abs(refined[soft] - fg).mean()
    assert error_after < 0.4 * error_before  # blur fusion is approximate; here ~4x better
    assert refined.min() >= 0 and refined.max() <= 1


def test_refine_foreground_keeps_opaque_pixels():
    image = torch.rand(3, 40, 50)
    refined = refine_foreground(image, torch.ones(40, 50))
    torch.testing.assert_close(refined, image, atol=1e-4, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_refine_foreground_runs_on_cuda():
    image, alpha, _ = soft_composite()
    cpu = refine_foreground(torch.from_numpy(image).permute(2, 0, 1), torch.from_numpy(alpha))
    gpu = refine_foreground(torch.from_numpy(image).permute(2, 0, 1).cuda(), torch.from_numpy(alpha).cuda())
    assert gpu.is_cuda
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=0)


# --------------------------------------------------------------------------------------------
# Composition and encoding
# --------------------------------------------------------------------------------------------


def test_compose_cutout_is_rgba_with_the_mask_as_alpha(astronaut):
    mask = np.linspace(0, 1, 512 * 512, dtype=np.float32).reshape(512, 512)
    cutout = compose_cutout(astronaut, mask, refine=False)
    assert cutout.mode == "RGBA" and cutout.size == astronaut.size
    pixels = np.asarray(cutout)
    assert np.array_equal(pixels[..., :3], np.asarray(astronaut))
    assert np.array_equal(pixels[..., 3], np.asarray(mask_to_image(mask)))
    refined = compose_cutout(astronaut, mask, refine=True)
    assert refined.size == astronaut.size and np.array_equal(np.asarray(refined)[..., 3], pixels[..., 3])


def test_compose_cutout_rejects_a_mask_of_another_size(astronaut):
    with pytest.raises(ValueError, match="mask"):
        compose_cutout(astronaut, np.zeros((10, 10), np.float32), refine=False)


@pytest.fixture(scope="module")
def cutout(astronaut) -> Image.Image:
    image = astronaut.resize((120, 90))
    alpha = np.zeros((90, 120), np.uint8)
    alpha[20:70, 30:90] = 255
    alpha[20:70, 25:30] = 100  # a soft edge
    image.putalpha(Image.fromarray(alpha))
    return image


def test_encode_png_is_lossless(cutout):
    encoded = encode_image(cutout, "png")
    assert (encoded.content_type, encoded.extension, encoded.width, encoded.height) == (
        "image/png",
        ".png",
        120,
        90,
    )
    assert encoded.file_size == len(encoded.data)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(encoded.data))), np.asarray(cutout))


def test_encode_webp_keeps_alpha_exactly(cutout):
    encoded = encode_image(cutout, "WEBP")
    assert encoded.content_type == "image/webp" and encoded.extension == ".webp"
    decoded = Image.open(io.BytesIO(encoded.data))
    assert decoded.mode == "RGBA" and decoded.size == (120, 90)
    assert np.array_equal(np.asarray(decoded)[..., 3], np.asarray(cutout)[..., 3])


def test_encode_gif_keeps_transparency(cutout):
    encoded = encode_image(cutout, "gif")
    assert encoded.content_type == "image/gif" and encoded.extension == ".gif"
    decoded = Image.open(io.BytesIO(encoded.data))
    assert decoded.size == (120, 90) and "transparency" in decoded.info
    alpha = np.asarray(decoded.convert("RGBA"))[..., 3]
    expected = np.asarray(cutout)[..., 3] >= 128
    assert np.array_equal(alpha > 0, expected)


@pytest.mark.parametrize("fmt", ["png", "webp", "gif"])
def test_mask_encodes_as_8_bit_grey(fmt):
    mask = np.tile(np.linspace(0, 1, 64, dtype=np.float32), (48, 1))
    encoded = encode_image(mask_to_image(mask), fmt, lossless=True)
    decoded = Image.open(io.BytesIO(encoded.data))
    assert (decoded.width, decoded.height) == (64, 48) == (encoded.width, encoded.height)
    if fmt == "png":
        assert decoded.mode == "L"
    levels = np.asarray(decoded.convert("L")).astype(int)
    assert np.abs(levels - np.asarray(mask_to_image(mask)).astype(int)).max() <= 1


def test_unknown_output_format_is_refused(cutout):
    with pytest.raises(ValueError, match="jpeg"):
        encode_image(cutout, "jpeg")
