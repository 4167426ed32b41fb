"""Dynamic batching: concurrent jobs share forward passes; results and failures stay per job."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image
from skimage import data as samples

from common.domain.variants import VariantSpec
from common.settings import Settings
from worker.batcher import MaskBatcher
from worker.engine import Predictor


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    settings = Settings(torch_threads=2, weights_fallback="none")
    spec = VariantSpec(id="nano", weights="recipe", backbone="swin_v1_nano")
    loaded = Predictor(spec, settings)
    loaded.load()
    return loaded


def photos() -> list[Image.Image]:
    return [
        Image.fromarray(p)
        for p in (samples.astronaut(), samples.chelsea(), samples.coffee(), samples.rocket())
    ]


@pytest.mark.parametrize("kind", ["pil", "array"])  # arrays: what the worker's decoder hands the batcher
def test_concurrent_jobs_run_as_one_batch_with_their_own_masks(predictor: Predictor, kind: str):
    batcher = MaskBatcher(predictor, max_size=4, wait_seconds=0.5)
    images = photos() if kind == "pil" else [np.asarray(image) for image in photos()]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda im: batcher.predict(im, (256, 256)), images))
    assert max(size for _, size in results) > 1, "jobs arriving together share a forward pass"
    for image, (mask, _) in zip(images, results, strict=True):
        (alone,) = predictor.predict_masks([image], (256, 256))
        height, width = np.asarray(image).shape[:2]
        assert mask.shape == (height, width)
        assert np.abs(mask - alone).max() < 1e-4, "a batched mask equals the mask computed alone"


def test_different_resolutions_are_not_mixed(predictor: Predictor):
    batcher = MaskBatcher(predictor, max_size=4, wait_seconds=0.3)
    image = photos()[0]
    with ThreadPoolExecutor(2) as pool:
        small, large = pool.map(lambda res: batcher.predict(image, res), [(256, 256), (320, 320)])
    assert small[1] == 1 and large[1] == 1
    assert small[0].shape == large[0].shape == (512, 512)


def test_one_bad_input_fails_only_its_own_job(predictor: Predictor):
    batcher = MaskBatcher(predictor, max_size=3, wait_seconds=0.5)
    good = photos()[:2]
    bad = Image.new("P", (64, 64))  # not RGB: the engine cannot make a tensor of it
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(batcher.predict, im, (256, 256)) for im in (good[0], bad, good[1])]
    assert futures[0].result()[0].shape == (512, 512)
    assert futures[2].result()[0].shape == (300, 451)
    with pytest.raises(Exception):  # noqa: B017 - whatever the engine raises reaches only that job
        futures[1].result()


def test_a_stuck_forward_times_its_jobs_out_and_hands_the_waiting_ones_back(
    predictor: Predictor, monkeypatch
):
    """The batcher's side of the run-time limit (the real-process behaviour is in tests/e2e/test_hang.py)."""
    import threading

    from worker.batcher import ForwardTimeout, WorkerUnavailable

    release = threading.Event()
    stuck = Image.new("RGB", (61, 40))
    forward = predictor.forward

    def hanging_forward(prepared):
        if prepared[0].size[0] == 61:
            release.wait()
        return forward(prepared)

    monkeypatch.setattr(predictor, "forward", hanging_forward)
    batcher = MaskBatcher(predictor, max_size=1, wait_seconds=0.0)
    with ThreadPoolExecutor(2) as pool:
        hung = pool.submit(batcher.predict, stuck, (64, 64), 0.5)
        threading.Event().wait(0.1)  # the hung one is in its forward before the next arrives
        waiting = pool.submit(batcher.predict, photos()[0], (64, 64), 0.5)
        with pytest.raises(ForwardTimeout):
            hung.result()
        with pytest.raises(WorkerUnavailable):  # never started: not its fault, another worker takes it
            waiting.result()
    assert batcher.busy_for() > 0.4 and batcher.forwards_done == 0
    batcher.declare_stuck("test")
    with pytest.raises(WorkerUnavailable):
        batcher.predict(photos()[1], (64, 64), 5)
    release.set()  # let the inference thread finish before the interpreter exits (torch in a daemon thread)
    for _ in range(300):
        if batcher.forwards_done:
            break
        threading.Event().wait(0.1)
