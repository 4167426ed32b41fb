"""The pure parts of the extension output stage (worker/pipeline/render.py, worker/pipeline/encode.py,
common/domain/extensions.py), without processes."""

from __future__ import annotations

from io import BytesIO

import numpy as np
import pytest
from PIL import Image

from common.domain.errors import InvalidInputError
from common.domain.extensions import parse_aspect_ratio, parse_hex_color, parse_margin
from common.domain.schemas import JobParams
from common.settings import Settings
from tests.helpers.hooked_worker import HooksForTests
from worker.masks import mask_png
from worker.pipeline.decode import read_mask_png
from worker.pipeline.encode import check_output_format, supported_formats
from worker.pipeline.postprocess import to_alpha8, to_mask
from worker.pipeline.render import crop_padded, render, subject_box
from worker.pipeline.types import EncodeOptions


def test_parsers():
    assert parse_hex_color("#FF8000") == (255, 128, 0, 255)
    assert parse_hex_color("#ff800080") == (255, 128, 0, 128)
    assert parse_margin(24).pixels(100, 50) == (24, 24)
    assert parse_margin("24px").pixels(100, 50) == (24, 24)
    assert parse_margin("10%").pixels(100, 50) == (10, 5)
    assert parse_aspect_ratio("16:9") == pytest.approx(16 / 9)
    assert parse_aspect_ratio("4/5") == pytest.approx(0.8)
    assert parse_aspect_ratio(1.5) == 1.5
    for bad in ("0:1", "1:0", "x", 100):
        with pytest.raises(ValueError):
            parse_aspect_ratio(bad)
    for bad in ("5 %%", "-1", 4097, "2.5px", True):
        with pytest.raises(ValueError):
            parse_margin(bad)


def test_subject_box_margin_aspect_and_padding_beyond_the_input():
    mask = np.zeros((40, 60), np.float32)
    mask[10:20, 5:25] = 0.9  # 20 wide, 10 high
    assert subject_box(mask, threshold=0.5) == (5, 10, 25, 20)
    assert subject_box(mask, threshold=0.5, margin=8) == (-3, 2, 33, 28)  # past the left edge
    assert subject_box(mask, threshold=0.5, aspect_ratio="1:1") == (
        5,
        5,
        25,
        25,
    )  # height grown around the centre
    assert subject_box(mask, threshold=0.5, aspect_ratio="4:1") == (-5, 10, 35, 20)  # width grown
    cut = crop_padded(mask, (-3, 2, 33, 28))
    assert cut.shape == (26, 36) and cut[:, :3].max() == 0 and cut[8:18, 8:28].min() == pytest.approx(0.9)
    with pytest.raises(InvalidInputError) as raised:
        subject_box(mask, threshold=0.95)
    assert raised.value.error_type == "subject_not_found" and raised.value.field == "crop_to_subject"


def test_quantised_mask_survives_its_png_exactly():
    mask = np.random.default_rng(1).random((33, 47), dtype=np.float32)
    kept = to_alpha8(mask)
    assert np.abs(kept / np.float32(255) - mask).max() <= 0.5 / 255 + 1e-7
    assert np.array_equal(read_mask_png(mask_png(kept)), kept)


def test_capability_override_and_contain_with_an_opaque_colour():
    simulated = HooksForTests(unsupported_output_formats="avif").unsupported_output_formats
    supported = supported_formats() - set(simulated)
    assert "avif" not in supported and "png" in supported
    with pytest.raises(InvalidInputError) as raised:
        check_output_format("avif", supported)
    assert raised.value.error_type == "unsupported_output_format" and "simulated" in raised.value.message

    image = Image.new("RGB", (40, 30), (200, 10, 10))
    mask = np.zeros((30, 40), np.float32)
    params = JobParams(
        background_image_url="https://x.example/b.png",
        background_fit="contain",
        background_color="#0000ff",
        refine_foreground=False,
    )
    backdrop = Image.new("RGB", (40, 10), (0, 255, 0))
    settings = Settings()
    rendered = render(
        image,
        to_mask(mask),
        params,
        background=backdrop,
        encoding=EncodeOptions.from_settings(settings),
        max_side=settings.max_input_side,
        max_pixels=settings.max_input_pixels,
    )
    out = Image.open(BytesIO(rendered.image.data))
    assert (
        out.mode == "RGB" and out.getpixel((20, 0)) == (0, 0, 255) and out.getpixel((20, 15)) == (0, 255, 0)
    )
