"""worker.pipeline's CPU paths, the null model and the device-side paths run on CPU tensors."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from bench.reference_paths import refined_colours
from common.domain.errors import ImageTooLargeError
from common.domain.schemas import JobParams
from common.domain.variants import VariantSpec
from common.settings import Settings
from worker.engine import Predictor
from worker.pipeline import decode, encode, prepare, refine
from worker.pipeline.decode import decode_image
from worker.pipeline.postprocess import to_alpha8, to_mask
from worker.pipeline.prepare import device_input
from worker.pipeline.render import device_cutout, render
from worker.pipeline.types import EncodeOptions

MAX_PIXELS = 64_000_000


def real_photos() -> dict[str, np.ndarray]:
    return {
        "astronaut": data.astronaut(),
        "chelsea": data.chelsea(),
        "coffee": data.coffee(),
        "rocket": data.rocket(),
    }


def soft_masks(rgb: np.ndarray) -> dict[str, np.ndarray]:
    """Masks with soft edges of different kinds: a feathered ellipse, one that follows the photo's
    own edges (blurred brightness threshold, ragged like hair), and uniform noise (all soft)."""
    height, width = rgb.shape[:2]
    ys, xs = np.mgrid[0:height, 0:width]
    distance = np.sqrt(((xs - width / 2) / (width * 0.3)) ** 2 + ((ys - height / 2) / (height * 0.4)) ** 2)
    ellipse = np.clip((1 - distance) * 12 + 0.5, 0, 1).astype(np.float32)
    grey = torch.from_numpy(rgb.mean(axis=2, dtype=np.float32))[None, None]
    smooth = torch.nn.functional.avg_pool2d(grey, 9, stride=1, padding=4)[0, 0].numpy()
    content = np.clip((smooth - np.median(smooth)) / 40 + 0.5, 0, 1).astype(np.float32)
    noise = np.random.default_rng(3).random((height, width), dtype=np.float32)
    return {"ellipse": ellipse, "content": content, "noise": noise}


@pytest.mark.parametrize("photo", list(real_photos()))
def test_refine_keeps_the_visual_result_of_the_reference_implementation(photo):
    rgb = real_photos()[photo]
    for name, mask in soft_masks(rgb).items():
        reference = refined_colours(Image.fromarray(rgb), mask).astype(np.int16)
        alpha8 = to_alpha8(mask)
        fast = refine.refine_colours(rgb, mask, alpha8).astype(np.int16)
        visible, soft = alpha8 > 0, (alpha8 > 0) & (alpha8 < 255)
        difference = np.abs(fast - reference)
        assert difference[visible].mean() <= 1.0, f"{photo}/{name}: mean |diff| over alpha > 0"
        assert difference[soft].mean() <= 1.0, f"{photo}/{name}: mean |diff| over soft pixels alone"
        opaque = alpha8 == 255
        assert np.abs(fast[opaque] - rgb.astype(np.int16)[opaque]).max(initial=0) <= 2, (
            "opaque pixels keep colour"
        )


def test_refine_of_an_opaque_mask_is_the_image():
    rgb = data.coffee()
    assert np.array_equal(refine.refine_colours(rgb, np.ones(rgb.shape[:2], np.float32)), rgb)


def jpeg(array: np.ndarray, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=92, **options)
    return buffer.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_fast_jpeg_decode_matches_the_general_decoder(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    payload = jpeg(data.chelsea(), exif=exif.tobytes())
    assert decode._fast_jpeg(payload, max_pixels=MAX_PIXELS, max_side=8192, min_side=8) is not None
    fast = decode.decode_rgb(payload, max_pixels=MAX_PIXELS, max_side=8192).astype(np.int16)
    general = np.asarray(decode_image(payload, max_pixels=MAX_PIXELS, max_side=8192)).astype(np.int16)
    assert fast.shape == general.shape
    assert np.abs(fast - general).max() <= 2  # two builds of libjpeg-turbo; both upsample the same way


def test_decode_falls_back_for_grey_png_and_reports_the_same_errors():
    grey = jpeg(data.camera())
    assert decode.decode_rgb(grey, max_pixels=MAX_PIXELS, max_side=8192).shape == (512, 512, 3)
    buffer = io.BytesIO()
    Image.fromarray(data.astronaut()).save(buffer, format="PNG")
    png = buffer.getvalue()
    assert np.array_equal(decode.decode_rgb(png, max_pixels=MAX_PIXELS, max_side=8192), data.astronaut())
    with pytest.raises(ImageTooLargeError) as fast:
        decode.decode_rgb(jpeg(data.astronaut()), max_pixels=100_000, max_side=8192)
    with pytest.raises(ImageTooLargeError) as general:
        decode_image(jpeg(data.astronaut()), max_pixels=100_000, max_side=8192)
    assert str(fast.value) == str(general.value)


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_png_encoder_round_trips_and_stays_below_raw_size(channels):
    rgb = data.astronaut()
    pixels_ = rgb[..., 0] if channels == 1 else rgb if channels == 3 else np.dstack([rgb, rgb[..., 1]])
    for level in (1, 6):
        encoded = encode.encode_png(np.ascontiguousarray(pixels_), level)
        decoded = Image.open(io.BytesIO(encoded))
        decoded.load()
        assert decoded.mode == {1: "L", 3: "RGB", 4: "RGBA"}[channels]
        assert np.array_equal(np.asarray(decoded), pixels_)
        assert len(encoded) < pixels_.nbytes


def test_network_input_is_normalised_like_the_reference():
    rgb = data.astronaut()
    got = prepare.input_array(rgb, (512, 512))
    reference = ((rgb.astype(np.float32) / 255 - prepare.IMAGENET_MEAN) / prepare.IMAGENET_STD).transpose(
        2, 0, 1
    )
    np.testing.assert_allclose(got, reference, atol=1e-5)
    shrunk = prepare.input_array(rgb, (256, 128))
    assert shrunk.shape == (3, 128, 256) and shrunk.dtype == np.float32


def test_device_path_on_cpu_tensors_matches_the_cpu_path():
    """The CUDA path's functions are device-agnostic torch: checked here on CPU tensors."""
    rgb = data.chelsea()
    mask = soft_masks(rgb)["ellipse"]
    tensor = torch.from_numpy(rgb).permute(2, 0, 1)
    rgba, alpha8 = device_cutout(tensor, torch.from_numpy(mask), refine=True)
    assert rgba.shape == (*rgb.shape[:2], 4) and rgba.dtype == np.uint8
    assert np.array_equal(alpha8, to_alpha8(mask)) and np.array_equal(rgba[..., 3], alpha8)
    cpu = refine.refine_colours(rgb, mask, alpha8).astype(np.int16)
    visible = alpha8 > 0
    assert np.abs(rgba[..., :3].astype(np.int16) - cpu)[visible].mean() <= 1.0
    on_device = device_input(tensor, (480, 320)).numpy()
    assert np.abs(on_device - prepare.input_array(rgb, (480, 320))).mean() < 0.02


def test_null_model_is_explicit_constant_and_says_so():
    spec = VariantSpec(id="nano-test", weights="recipe", backbone="swin_v1_nano")
    predictor = Predictor(spec, Settings(device="cpu", benchmark_null_model=True))
    predictor.load()
    assert predictor.null_model and predictor.untrained
    assert "NULL MODEL" in predictor.weights_description
    camera = np.repeat(data.camera()[..., None], 3, axis=2)
    first, second, other = predictor.predict_masks([data.astronaut(), camera, data.coffee()], (128, 128))
    assert np.array_equal(first, second), "the same mask whatever the photo"
    assert first.shape == (512, 512) and other.shape == (400, 600)
    assert 0.05 < first.mean() < 0.95 and ((first > 0.01) & (first < 0.99)).any(), "soft-edged, not flat"
    assert not Predictor(spec, Settings(device="cpu")).null_model, "never without the explicit setting"


def test_render_outputs_png_is_the_composed_cutout(tmp_path):
    rgb = data.astronaut()
    mask = soft_masks(rgb)["content"]
    rendered = render(
        rgb,
        to_mask(mask),
        JobParams(output_format="png", output_mask=True, refine_foreground=False),
        encoding=EncodeOptions(),
    )
    cutout = np.asarray(Image.open(io.BytesIO(rendered.image.data)))
    assert np.array_equal(cutout[..., :3], rgb)
    assert np.array_equal(cutout[..., 3], to_alpha8(mask))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(rendered.mask.data))), cutout[..., 3])


def test_cuda_warm_up_covers_every_allowed_resolution_and_batch_size():
    spec = VariantSpec(
        id="nano-test",
        weights="recipe",
        backbone="swin_v1_nano",
        allowed_resolutions=("1024x1024", "2048x2048"),
    )
    predictor = Predictor(spec, Settings(device="cpu", max_batch_size=3))
    assert predictor.warmup_shapes() == [((64, 64), 1)], "CPU: one small proof-of-life forward"
    predictor._device = torch.device("cuda")  # the plan only; nothing runs
    assert predictor.warmup_shapes() == (
        [((1024, 1024), b) for b in (1, 2, 3)] + [((2048, 2048), b) for b in (1, 2, 3)]
    )
    predictor.settings = Settings(device="cpu", max_batch_size=3, warmup_all_shapes=False)
    assert predictor.warmup_shapes() == [((1024, 1024), 1)]


def test_job_output_stage_keeps_a_device_mask_on_the_device():
    """What a CUDA job does after its forward, on CPU tensors: the mask is quantised where it is, one 8-bit
    copy comes back (kept and cached), and the output stage composes with the uploaded image there."""
    rgb = data.coffee()
    soft = soft_masks(rgb)["content"]
    device_rgb = torch.from_numpy(rgb).permute(2, 0, 1)
    device_mask = to_mask(torch.from_numpy(soft), device_rgb)
    host = device_mask.levels
    assert isinstance(device_mask.device_levels, torch.Tensor) and host.dtype == np.float32
    assert np.array_equal(to_alpha8(host), to_alpha8(soft)), "the host copy is the 8-bit mask"

    params = JobParams(output_format="png", output_mask=True, refine_foreground=True)
    # a blank host image: the device path must take its colours from the uploaded one
    blank = Image.new("RGB", (rgb.shape[1], rgb.shape[0]))
    on_device = render(blank, device_mask, params, encoding=EncodeOptions())
    on_host = render(Image.fromarray(rgb), to_mask(host), params, encoding=EncodeOptions())
    device_cut = np.asarray(Image.open(io.BytesIO(on_device.image.data)))
    host_cut = np.asarray(Image.open(io.BytesIO(on_host.image.data)))
    assert np.array_equal(device_cut[..., 3], host_cut[..., 3])
    assert np.array_equal(
        np.asarray(Image.open(io.BytesIO(on_device.mask.data))),
        np.asarray(Image.open(io.BytesIO(on_host.mask.data))),
    )
    visible = host_cut[..., 3] > 0
    assert np.abs(device_cut[..., :3].astype(np.int16) - host_cut[..., :3])[visible].mean() <= 1.0
