"""The worker checks the decoder patch order of the trained weights it loads (worker/loading.py,
worker/patch_order.py).

The network under test is a nano BiRefNet whose weights are CONSTRUCTED so that exactly one patch order is
right: its only path to the logits reads the 4x4 patch stack of the image (decoder.ipt_blk2) and computes
checkerboard-weighted red-minus-green contrasts of the same pixel in each of the 16 tiles, read in the
"right" order's channel layout. Within one pixel of a photo red and green are close, so the contrast is
small and the network answers relu(beta - |contrast|) * gain: confidently foreground. Read in the other
order, the same channels hold different tiles and colours, the contrast is large and the logits sit at 0:
unsure. Everything else in the decoder is zero (batch norms identity); the backbone has recipe weights.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import httpx
import pytest
import torch
from safetensors.torch import save_file

from common.domain.variants import VariantSpec
from common.settings import Settings
from devstack.services import free_port
from tests.helpers.stack import ROOT, Stack, wait_for
from worker.birefnet import BiRefNet, BiRefNetConfig, recipe_state_dict
from worker.engine import Predictor
from worker.patch_order import SAMPLES_DIR, decide

GRID = 4  # ipt_blk2 reads the image as 4x4 tiles
PHOTOS = ",".join(str(SAMPLES_DIR / name) for name in ("chelsea.jpg", "rocket.jpg"))
FAST = {
    "device": "cpu",
    "torch_threads": 1,
    "warmup_forward": False,
    "patch_order_check_resolution": "64x64",
    "patch_order_check_photos": PHOTOS,
    "weights_fallback": "none",
}


def stack_channel(order: str, colour: int, row: int, col: int) -> int:
    """Channel of (colour, tile row, tile col) in the decoder's patch stack (worker/birefnet/decoder.py)."""
    if order == "einops":
        return colour * GRID * GRID + row * GRID + col
    return (col * GRID + row) * 3 + colour


def constructed_state(right: str | None, beta: float = 1.0, gain: float = 8.0) -> dict[str, torch.Tensor]:
    """Nano BiRefNet weights that are confident only under the `right` order (None: the patch path is off,
    so both orders give identical masks)."""
    net = BiRefNet(BiRefNetConfig(backbone="swin_v1_nano"))
    state = recipe_state_dict(net)
    for key, value in state.items():
        if key.startswith("decoder.") and value.is_floating_point():
            leaf = key.rsplit(".", 1)[-1]
            value.fill_(1.0 if leaf == "running_var" or (leaf == "weight" and value.dim() == 1) else 0.0)

    def d(key: str) -> torch.Tensor:
        return state[f"decoder.{key}"]

    if right is not None:
        contrast = torch.zeros(3 * GRID * GRID)
        for row in range(GRID):
            for col in range(GRID):
                sign = 1.0 if (row + col) % 2 == 0 else -1.0
                contrast[stack_channel(right, 0, row, col)] = sign  # + red
                contrast[stack_channel(right, 1, row, col)] = -sign  # - green, same pixel
        d("ipt_blk2.conv1.weight")[0, :, 1, 1] = contrast  # s and -s: the ReLUs below keep both signs
        d("ipt_blk2.conv1.weight")[1, :, 1, 1] = -contrast
    d("ipt_blk2.conv_out.weight")[0, 0, 1, 1] = 1
    d("ipt_blk2.conv_out.weight")[1, 1, 1, 1] = 1
    first = d("decoder_block1.conv_in.weight").shape[1] - d("ipt_blk2.conv_out.weight").shape[0]
    d("decoder_block1.conv_in.weight")[0, first, 1, 1] = 1  # relu(s)
    d("decoder_block1.conv_in.weight")[1, first + 1, 1, 1] = 1  # relu(-s)
    aspp = "decoder_block1.dec_att"
    d(f"{aspp}.aspp1.atrous_conv.regular_conv.weight")[0, 0] = 1  # zero offsets, modulator 1: a plain 1x1
    d(f"{aspp}.aspp1.atrous_conv.regular_conv.weight")[1, 1] = 1
    d(f"{aspp}.conv1.weight")[0, :2] = -1  # relu(beta - |s|)
    d(f"{aspp}.bn1.bias")[0] = beta
    d("decoder_block1.conv_out.weight")[0, 0, 1, 1] = gain
    d("conv_out1.0.weight")[0, 0] = 1
    return state


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("constructed")
    paths = {}
    for right in ("legacy", "einops", None):
        path = folder / f"right-{right}.safetensors"
        save_file(constructed_state(right), str(path))
        paths[str(right)] = str(path)
    return paths


def loaded(weights: str, configured: str, **settings) -> Predictor:
    spec = VariantSpec(id="constructed", weights=weights, backbone="swin_v1_nano", patch_order=configured)
    predictor = Predictor(spec, Settings(**{**FAST, **settings}))
    predictor.load()
    return predictor


def test_decide_adopts_only_a_clear_and_consistent_winner():
    assert decide({"einops": [0.1, 0.1], "legacy": [0.3, 0.3]}, "einops", margin=0.02, pin=False)[:2] == (
        "legacy",
        "adopted",
    )
    assert decide({"einops": [0.1, 0.1], "legacy": [0.3, 0.3]}, "einops", margin=0.02, pin=True)[:2] == (
        "einops",
        "pinned",
    )
    assert decide({"einops": [0.3, 0.3], "legacy": [0.1, 0.1]}, "einops", margin=0.02, pin=False)[:2] == (
        "einops",
        "confirmed",
    )
    close = decide({"einops": [0.20, 0.21], "legacy": [0.21, 0.21]}, "einops", margin=0.02, pin=False)
    assert close[:2] == ("einops", "inconclusive") and "too close to call" in close[2]
    # A big average won on one photo out of three is not "most photos": keep the configured order.
    assert decide(
        {"einops": [0.1, 0.3, 0.3], "legacy": [0.45, 0.29, 0.29]}, "einops", margin=0.02, pin=False
    )[:2] == ("einops", "inconclusive")


@pytest.mark.parametrize("right", ["legacy", "einops"])
def test_wrongly_configured_order_is_replaced_by_the_right_one(checkpoints, right, caplog):
    wrong = "einops" if right == "legacy" else "legacy"
    with caplog.at_level(logging.WARNING):
        predictor = loaded(checkpoints[right], wrong)
    report = predictor.patch_order_report
    assert (report.configured, report.in_use, report.verdict) == (wrong, right, "adopted")
    assert report.confidence[right] > report.confidence[wrong] + 0.05
    assert predictor.network.decoder.patch_order == right
    assert "PATCH ORDER ADOPTED" in caplog.text and "looks WRONG" in caplog.text
    assert f"patch order {right} ADOPTED" in predictor.weights_description
    # It now serves what a correctly configured worker serves.
    reference = loaded(checkpoints[right], right)
    assert reference.patch_order_report.verdict == "confirmed"
    image = predictor_photo()
    assert torch.allclose(
        torch.from_numpy(predictor.predict_masks([image], (64, 64))[0]),
        torch.from_numpy(reference.predict_masks([image], (64, 64))[0]),
    )


def predictor_photo():
    from PIL import Image

    return Image.open(SAMPLES_DIR / "coffee.jpg").convert("RGB")


def test_pin_keeps_the_configured_order_and_says_it_looks_wrong(checkpoints, caplog):
    with caplog.at_level(logging.WARNING):
        predictor = loaded(checkpoints["legacy"], "einops", patch_order_check="pin")
    report = predictor.patch_order_report
    assert (report.in_use, report.verdict) == ("einops", "pinned")
    assert predictor.network.decoder.patch_order == "einops"
    assert "PATCH ORDER PINNED" in caplog.text and "BIREFNET_PATCH_ORDER_CHECK=pin" in caplog.text


def test_too_close_to_call_keeps_the_configured_order(checkpoints, caplog):
    with caplog.at_level(logging.WARNING):
        predictor = loaded(checkpoints["None"], "legacy")
    report = predictor.patch_order_report
    assert (report.in_use, report.verdict) == ("legacy", "inconclusive")
    assert report.confidence["einops"] == pytest.approx(report.confidence["legacy"])
    assert "too close to call" in caplog.text and "keeping the configured patch order legacy" in caplog.text


def test_recipe_weights_are_not_checked_and_the_log_says_why(caplog):
    with caplog.at_level(logging.INFO):
        predictor = loaded("recipe", "legacy")
    report = predictor.patch_order_report
    assert (report.in_use, report.verdict, report.confidence) == ("legacy", "skipped", {})
    assert "untrained recipe weights" in caplog.text and "noise" in caplog.text


def test_worker_exports_the_check_as_metrics_and_in_ops_status(stack: Stack, checkpoints):
    """A real worker process: the adopted order shows on /metrics and in `python -m ops status --json`."""
    port = free_port()
    overrides = {
        "general-light": {
            "backbone": "swin_v1_nano",
            "weights": checkpoints["legacy"],
            "patch_order": "einops",
        }
    }
    stack.start_worker(
        "general-light",
        extra_env={
            "BIREFNET_VARIANT_OVERRIDES": json.dumps(overrides),
            "BIREFNET_WORKER_METRICS_PORT": str(port),
            "BIREFNET_PATCH_ORDER_CHECK_RESOLUTION": "64x64",
            "BIREFNET_PATCH_ORDER_CHECK_PHOTOS": PHOTOS,
        },
    )
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    in_use = {
        line.split("{")[1].split("}")[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("birefnet_patch_order_in_use{")
    }
    assert in_use == {
        'configured="einops",order="einops",variant="general-light",verdict="adopted"': 0.0,
        'configured="einops",order="legacy",variant="general-light",verdict="adopted"': 1.0,
    }
    confidence = {
        line.split('order="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("birefnet_patch_order_confidence{")
    }
    assert confidence["legacy"] > confidence["einops"] + 0.05

    def status() -> dict | None:
        done = subprocess.run(
            [sys.executable, "-m", "ops", "status", "--json"],
            cwd=ROOT,
            env=stack.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        data = json.loads(done.stdout)
        return data if data["workers"] else None

    data = wait_for(status, 60, "the worker's heartbeat")
    report = data["workers"][0]["patch_order"]["general-light"]
    assert (report["configured"], report["in_use"], report["verdict"]) == ("einops", "legacy", "adopted")
    rendered = subprocess.run(
        [sys.executable, "-m", "ops", "status"],
        cwd=ROOT,
        env={**stack.env, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    assert "patch order" in rendered and "adopted" in rendered
