"""worker.engine: the predictor on the nano architecture (recipe weights, CPU) and output rendering."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import save_file
from skimage import data

from common.domain.errors import InvalidInputError
from common.domain.schemas import JobParams
from common.domain.variants import VariantSpec
from common.settings import Settings
from worker import patch_order_check
from worker.birefnet import recipe_state_dict
from worker.engine import Predictor
from worker.loading import build_native
from worker.pipeline.postprocess import to_mask
from worker.pipeline.render import render
from worker.pipeline.types import EncodeOptions, parse_resolution
from worker.timings import StageTimings
from worker.weights import WeightsError

RESOLUTION = (64, 64)  # smallest sensible size: keeps the nano forward well under a second


def nano_spec(weights: str = "recipe", **fields) -> VariantSpec:
    return VariantSpec(id="nano-test", weights=weights, backbone="swin_v1_nano", **fields)


def engine_settings(tmp_path=None, **fields) -> Settings:
    cache = str(tmp_path / "cache") if tmp_path else "~/.cache/birefnet"
    return Settings(device="cpu", weights_cache_dir=cache, **fields)


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    return [
        Image.fromarray(data.astronaut()),
        Image.fromarray(data.chelsea()),
        Image.fromarray(data.coffee()),
    ]


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    predictor = Predictor(nano_spec(), engine_settings(max_batch_size=4))
    predictor.load()
    return predictor


@pytest.fixture(scope="module")
def masks(predictor, photos) -> list[np.ndarray]:
    return predictor.predict_masks(photos, RESOLUTION)


# --------------------------------------------------------------------------------------------
# Resolutions
# --------------------------------------------------------------------------------------------


def test_parse_resolution_is_width_by_height():
    assert parse_resolution("1024x1024") == (1024, 1024)
    assert parse_resolution("2048x1024") == (2048, 1024)
    assert parse_resolution(" 2304X2304 ") == (2304, 2304)


@pytest.mark.parametrize("text", ["1024", "1000x1000", "0x64", "64x8192", "axb", ""])
def test_bad_resolutions_are_invalid_input(text):
    with pytest.raises(InvalidInputError) as error:
        parse_resolution(text)
    assert error.value.field == "operating_resolution"


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def test_recipe_predictor_says_it_is_untrained(predictor):
    assert predictor.untrained is True
    assert "UNTRAINED recipe weights" in predictor.weights_description
    assert str(predictor.device) == "cpu"


def test_unloaded_predictor_refuses_to_predict(photos):
    idle = Predictor(nano_spec(), engine_settings())
    with pytest.raises(RuntimeError, match="not loaded"):
        idle.predict_masks(photos[:1], RESOLUTION)
    with pytest.raises(RuntimeError, match="not loaded"):
        _ = idle.untrained


def test_real_checkpoint_is_used_and_not_marked_untrained(tmp_path, predictor, photos, masks):
    # The recipe weights saved as an ordinary checkpoint: loading them must give the same masks.
    model = build_native(nano_spec())
    path = tmp_path / "nano.safetensors"
    save_file(recipe_state_dict(model), path)
    loaded = Predictor(nano_spec(str(path)), engine_settings(tmp_path, warmup_forward=False))
    loaded.load()
    assert loaded.untrained is False
    assert str(path) in loaded.weights_description and "UNTRAINED" not in loaded.weights_description
    (mask,) = loaded.predict_masks(photos[:1], RESOLUTION)
    np.testing.assert_allclose(mask, masks[0], atol=1e-5)


def test_missing_checkpoint_fails_unless_recipe_fallback_is_on(tmp_path):
    spec = nano_spec(str(tmp_path / "missing.safetensors"))
    with pytest.raises(WeightsError, match="does not exist"):
        Predictor(spec, engine_settings(tmp_path, warmup_forward=False)).load()
    fallback = Predictor(spec, engine_settings(tmp_path, warmup_forward=False, weights_fallback="recipe"))
    fallback.load()
    assert fallback.untrained is True
    assert (
        "fallback" in fallback.weights_description and "missing.safetensors" in fallback.weights_description
    )


# --------------------------------------------------------------------------------------------
# predict_masks
# --------------------------------------------------------------------------------------------


def test_masks_are_float_probabilities_at_each_original_size(photos, masks):
    assert len(masks) == len(photos)
    for photo, mask in zip(photos, masks, strict=True):
        assert mask.shape == (photo.height, photo.width)
        assert mask.dtype == np.float32
        assert mask.min() >= 0.0 and mask.max() <= 1.0
        assert mask.std() > 1e-3  # a real map, not a constant


def test_batching_gives_the_same_masks_as_one_by_one(predictor, photos, masks):
    one_by_one = [predictor.predict_masks([photo], RESOLUTION)[0] for photo in photos]
    for batched, single in zip(masks, one_by_one, strict=True):
        np.testing.assert_allclose(batched, single, atol=1e-5)


def test_batches_are_split_by_max_batch_size(photos, masks):
    small_batches = Predictor(nano_spec(), engine_settings(max_batch_size=2, warmup_forward=False))
    small_batches.load()
    for got, expected in zip(small_batches.predict_masks(photos, RESOLUTION), masks, strict=True):
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_non_square_resolution_and_timings(predictor, photos):
    timings = StageTimings()
    (mask,) = predictor.predict_masks(photos[1:2], (96, 64), timings=timings)
    assert mask.shape == (300, 451)
    assert {"preprocess", "forward", "postprocess"} <= timings.seconds.keys()
    with pytest.raises(InvalidInputError):
        predictor.predict_masks(photos[:1], (100, 64))


# --------------------------------------------------------------------------------------------
# render_outputs
# --------------------------------------------------------------------------------------------


def render_outputs(image, mask, *, timings=None, **fields):
    """The output stage for a float mask and fal's four output fields (as the worker renders with its
    default encoder settings)."""
    return render(
        image, to_mask(mask), JobParams.model_construct(**fields), encoding=EncodeOptions(), timings=timings
    )


def open_encoded(encoded) -> Image.Image:
    image = Image.open(io.BytesIO(encoded.data))
    assert (image.width, image.height) == (encoded.width, encoded.height)
    assert encoded.file_size == len(encoded.data)
    return image


@pytest.mark.parametrize("fmt", ["png", "webp", "gif"])
def test_render_cutout_and_mask(predictor, photos, masks, fmt):
    photo, mask = photos[1], masks[1]
    timings = StageTimings()
    rendered = render_outputs(
        photo,
        mask,
        output_format=fmt,
        output_mask=True,
        refine_foreground=True,
        mask_only=False,
        timings=timings,
    )
    assert rendered.image.content_type == f"image/{fmt}" and rendered.image.extension == f".{fmt}"
    cutout = open_encoded(rendered.image)
    assert cutout.size == photo.size
    assert cutout.convert("RGBA").mode == "RGBA" and ("transparency" in cutout.info or cutout.mode == "RGBA")
    assert rendered.mask is not None and rendered.mask.content_type == f"image/{fmt}"
    mask_image = open_encoded(rendered.mask)
    assert mask_image.size == photo.size
    if fmt == "png":
        assert mask_image.mode == "L"
        expected = np.clip(np.rint(mask * 255), 0, 255)
        assert np.array_equal(np.asarray(mask_image), expected.astype(np.uint8))
        assert np.array_equal(np.asarray(cutout)[..., 3], np.asarray(mask_image))
    assert {"refine", "compose", "encode"} <= timings.seconds.keys()


def test_render_without_refinement_keeps_the_decoded_colours(photos, masks):
    rendered = render_outputs(
        photos[0], masks[0], output_format="png", output_mask=False, refine_foreground=False, mask_only=False
    )
    assert rendered.mask is None
    cutout = np.asarray(open_encoded(rendered.image))
    assert cutout.shape == (512, 512, 4)
    assert np.array_equal(cutout[..., :3], np.asarray(photos[0]))


def test_mask_only_returns_the_mask_as_the_image(predictor, photos, masks):
    timings = StageTimings()
    rendered = render_outputs(
        photos[2],
        masks[2],
        output_format="webp",
        output_mask=True,
        refine_foreground=True,
        mask_only=True,
        timings=timings,
    )
    assert rendered.mask is None
    image = open_encoded(rendered.image)
    assert image.size == photos[2].size and rendered.image.content_type == "image/webp"
    assert "refine" not in timings.seconds  # mask_only skips the foreground refinement
    levels = np.asarray(image.convert("L")).astype(int)
    assert np.abs(levels - np.rint(masks[2] * 255)).max() <= 1  # lossless


def test_unknown_output_format_is_invalid_input(photos, masks):
    with pytest.raises(InvalidInputError) as error:
        render_outputs(
            photos[0],
            masks[0],
            output_format="bmp",
            output_mask=False,
            refine_foreground=False,
            mask_only=False,
        )
    assert error.value.field == "output_format"


# --------------------------------------------------------------------------------------------
# python -m worker.patch_order_check
# --------------------------------------------------------------------------------------------


def test_patch_order_check_reports_both_orders(tmp_path, photos, capsys):
    paths = []
    for index, photo in enumerate(photos[:2]):
        paths.append(tmp_path / f"photo{index}.jpg")
        photo.save(paths[-1])
    exit_code = patch_order_check.main(
        [
            "--weights",
            "recipe",
            "--backbone",
            "swin_v1_nano",
            "--resolution",
            "64x64",
            "--device",
            "cpu",
            *map(str, paths),
        ]
    )
    out = capsys.readouterr().out
    assert exit_code == 0
    assert "| photo | einops | legacy |" in out and "untrained" in out
    overall = next(line for line in out.splitlines() if line.startswith("| **overall**"))
    einops, legacy = (float(cell) for cell in overall.strip("| ").split("|")[1:])
    assert 0 < einops < 0.5 and 0 < legacy < 0.5
    assert "most likely patch order" in out or "inconclusive" in out


def test_forward_splits_batches_past_the_32_bit_index_limit(predictor, monkeypatch):
    """CUDA's channels-last bilinear upsampling fails past 2**31 elements (batch 8 at 2048² does): such a
    batch runs as smaller forwards with the same logits. Here the limit is reached at a small size."""
    import torch

    from worker import engine

    batch = torch.randn(4, 3, 64, 64)
    whole = predictor._forward(batch)
    calls = []
    network = predictor._network
    monkeypatch.setattr(predictor, "_network", lambda x: calls.append(x.shape[0]) or network(x))
    monkeypatch.setattr(engine, "FULL_RES_CHANNELS", (2**31 - 1) // (64 * 64 * 2))  # two images per forward
    split = predictor._forward(batch)
    assert calls == [2, 2]
    assert torch.allclose(split, whole, atol=1e-5)
