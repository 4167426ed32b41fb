"""The worker's per-image CPU work around the forward, today's path beside the one it replaced.

Part 1, per stage (decode, preprocess, postprocess, refine, compose, encode), one image at a time, CPU and
wall ms, best of --repeats, with the null model's constant mask: the baseline (the earlier code:
Pillow, torch resize and blur fusion, PNG level 3) beside worker.pipeline, plus output bytes. Part 2: the
engine with the null model and N job threads around one batcher at 1 MP: images/s and CPU ms per image.
Part 3: how freely another Python thread runs during each stage (the GIL).

    .venv/bin/python bench/bench_engine.py [--repeats 5] [--threads 1 2 4] [--images 48]
    .venv/bin/python bench/bench_engine.py --forward --backbone swin_v1_t   # also time a real forward
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from skimage import data

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchstack import cpu_model  # noqa: E402
from reference_paths import encode_image, mask_to_image, refined_colours, rgba_from  # noqa: E402

from common.domain.schemas import JobParams  # noqa: E402
from common.domain.variants import VariantSpec  # noqa: E402
from common.settings import Settings  # noqa: E402
from worker.batcher import MaskBatcher  # noqa: E402
from worker.engine import Predictor  # noqa: E402
from worker.null_model import NullNetwork  # noqa: E402
from worker.pipeline.decode import decode_image, decode_rgb  # noqa: E402
from worker.pipeline.encode import encode_png  # noqa: E402
from worker.pipeline.postprocess import mask_at_size, postprocess, to_alpha8, to_mask  # noqa: E402
from worker.pipeline.prepare import input_array  # noqa: E402
from worker.pipeline.refine import refine_colours  # noqa: E402
from worker.pipeline.render import render, rgba_array  # noqa: E402
from worker.pipeline.types import EncodeOptions, parse_resolution  # noqa: E402
from worker.timings import StageTimings  # noqa: E402

FULL_OUTPUTS = JobParams(output_format="png", output_mask=True, refine_foreground=True)

STAGES = ("decode", "preprocess", "postprocess", "refine", "compose", "encode")
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def make_photos() -> dict[str, bytes]:
    photos = {
        "1024x1024 (1.0 MP)": Image.fromarray(data.astronaut()).resize(
            (1024, 1024), Image.Resampling.BICUBIC
        ),
        "4000x3000 (12 MP)": Image.fromarray(data.chelsea()).resize((4000, 3000), Image.Resampling.BICUBIC),
    }
    encoded = {}
    for name, image in photos.items():
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        encoded[name] = buffer.getvalue()
    return encoded


def null_probabilities(resolution: tuple[int, int]) -> np.ndarray:
    width, height = resolution
    with torch.inference_mode():
        logits = NullNetwork()(torch.zeros(1, 3, height, width))
    return logits.sigmoid()[0, 0].numpy().copy()


class Clock:
    """CPU seconds of the whole process (all threads) and wall seconds, per named stage."""

    def __init__(self) -> None:
        self.cpu: dict[str, float] = {}
        self.wall: dict[str, float] = {}

    def time(self, stage: str, fn, *args, **kwargs):
        cpu, wall = time.process_time(), time.perf_counter()
        result = fn(*args, **kwargs)
        self.cpu[stage] = self.cpu.get(stage, 0.0) + time.process_time() - cpu
        self.wall[stage] = self.wall.get(stage, 0.0) + time.perf_counter() - wall
        return result


# ---- the earlier implementation, kept here as the baseline ----------------------------------------


def baseline_input(image: Image.Image, resolution: tuple[int, int]) -> torch.Tensor:
    resized = image if image.size == resolution else image.resize(resolution, Image.Resampling.BILINEAR)
    array = (np.asarray(resized, dtype=np.float32) / np.float32(255.0) - IMAGENET_MEAN) / IMAGENET_STD
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def baseline_mask(probabilities: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    width, height = size
    p = torch.from_numpy(probabilities)[None]
    if p.shape[-2:] != (height, width):
        p = F.interpolate(
            p[None], size=(height, width), mode="bilinear", align_corners=False, antialias=True
        )[0]
    return p[0].clamp_(0.0, 1.0).numpy()


def baseline_job(jpeg: bytes, probabilities: np.ndarray, resolution, settings: Settings, clock: Clock):
    image = clock.time("decode", decode_image, jpeg, max_pixels=settings.max_input_pixels, max_side=8192)
    clock.time("preprocess", baseline_input, image, resolution)
    mask = clock.time("postprocess", baseline_mask, probabilities, image.size)
    colours = clock.time("refine", refined_colours, image, mask, "cpu")
    cutout = clock.time("compose", rgba_from, colours, mask)
    mask_image = clock.time("compose", mask_to_image, mask)

    def encode():
        return (
            encode_image(cutout, "png", png_compress_level=3).data,
            encode_image(mask_image, "png", png_compress_level=3).data,
        )

    return clock.time("encode", encode), cutout


def current_job(jpeg: bytes, probabilities: np.ndarray, resolution, settings: Settings, clock: Clock):
    rgb = clock.time("decode", decode_rgb, jpeg, max_pixels=settings.max_input_pixels, max_side=8192)
    clock.time("preprocess", input_array, rgb, resolution)
    size = (rgb.shape[1], rgb.shape[0])
    mask = clock.time("postprocess", mask_at_size, probabilities.copy(), size)
    timings = StageTimings()
    cpu, wall = time.process_time(), time.perf_counter()
    rendered = render(
        rgb, to_mask(mask), FULL_OUTPUTS, encoding=EncodeOptions.from_settings(settings), timings=timings
    )
    # render times its own stages (wall); CPU time is apportioned by their wall shares.
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    for stage, seconds in timings.seconds.items():
        clock.wall[stage] = clock.wall.get(stage, 0.0) + seconds
        clock.cpu[stage] = clock.cpu.get(stage, 0.0) + cpu * seconds / max(wall, 1e-9)
    cutout = Image.open(io.BytesIO(rendered.image.data))
    return (rendered.image.data, rendered.mask.data if rendered.mask else b""), cutout


def stage_table(photos: dict[str, bytes], args, settings: Settings) -> None:
    resolution = parse_resolution(args.resolution)
    probabilities = null_probabilities(resolution)
    rows: dict[str, dict[str, tuple[float, float]]] = {}
    sizes: dict[str, dict[str, int]] = {}
    for name, jpeg in photos.items():
        for label, job in (("baseline", baseline_job), ("current", current_job)):
            # torch (the baseline's refine and mask resize) on one thread: no spinning pool threads in
            # its CPU time
            torch.set_num_threads(1)
            job(jpeg, probabilities, resolution, settings, Clock())  # warm caches and pools
            clocks = []
            for _ in range(args.repeats):
                clock = Clock()
                (outputs, cutout) = job(jpeg, probabilities, resolution, settings, clock)
                clocks.append(clock)
            # Best of N: the run least disturbed by other load on a shared machine.
            rows[f"{name} {label}"] = {
                stage: (
                    min(c.cpu.get(stage, 0.0) for c in clocks),
                    min(c.wall.get(stage, 0.0) for c in clocks),
                )
                for stage in STAGES
            }
            sizes.setdefault(name, {})[f"{label} cut-out"] = len(outputs[0])
            sizes[name][f"{label} mask"] = len(outputs[1])
            for level in (1, 6):  # the same pixels through Pillow's encoder
                buffer = io.BytesIO()
                cutout.save(buffer, format="PNG", compress_level=level)
                sizes[name][f"{label} cut-out, Pillow PNG level {level}"] = buffer.tell()
            sizes[name]["raw RGBA"] = cutout.width * cutout.height * 4

    print("### Per-image CPU stages (bytes in -> cut-out + mask PNG), CPU ms (all threads) / wall ms\n")
    print("| stage | " + " | ".join(rows) + " |")
    print("| --- |" + " ---: |" * len(rows))
    for stage in STAGES:
        print(
            f"| {stage} | "
            + " | ".join(f"{r[stage][0] * 1000:.1f} / {r[stage][1] * 1000:.1f}" for r in rows.values())
            + " |"
        )
    print(
        "| **total** | "
        + " | ".join(
            f"**{sum(v[0] for v in r.values()) * 1000:.0f} / {sum(v[1] for v in r.values()) * 1000:.0f}**"
            for r in rows.values()
        )
        + " |"
    )
    names = list(photos)
    for name in names:
        base = sum(v[0] for v in rows[f"{name} baseline"].values())
        now = sum(v[0] for v in rows[f"{name} current"].values())
        print(f"\n{name}: current / baseline CPU time = {now / base:.3f}")
    print("\n### Output bytes\n")
    print("| file | " + " | ".join(names) + " |")
    print("| --- |" + " ---: |" * len(names))
    for key in sizes[names[0]]:
        print(f"| {key} | " + " | ".join(f"{sizes[n][key]:,}" for n in names) + " |")


def engine_throughput(jpeg: bytes, args, settings: Settings) -> None:
    resolution = parse_resolution(args.resolution)
    spec = VariantSpec(id="bench-null", weights="recipe", backbone="swin_v1_nano")
    # torch_threads 0: the worker's own choice for the null model (one torch thread, see Predictor.load)
    predictor = Predictor(
        spec, settings.model_copy(update={"benchmark_null_model": True, "torch_threads": 0})
    )
    predictor.load()
    print(
        f"\n### Engine, one process, null model ({predictor.weights_description}); "
        f"{torch.get_num_threads()} torch thread(s)\n"
    )
    print(
        "1 MP JPEG bytes -> decode -> batcher (null forward) -> mask -> refine -> cut-out + mask PNG, no S3\n"
    )
    print("| job threads | images | seconds | images/s | CPU ms per image | batch sizes seen |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for threads in args.threads:
        batcher = MaskBatcher(
            predictor, max_size=settings.max_batch_size, wait_seconds=settings.batch_wait_ms / 1000
        )

        def job(_: int, batcher: MaskBatcher = batcher) -> int:
            rgb = decode_rgb(jpeg, max_pixels=settings.max_input_pixels, max_side=8192)
            prepared = predictor.prepare(rgb, resolution)
            logits, _ = batcher.infer(prepared)
            rendered = render(
                rgb,
                postprocess(logits, prepared),
                FULL_OUTPUTS,
                encoding=EncodeOptions.from_settings(settings),
            )
            return rendered.image.file_size

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(job, range(threads)))  # warm-up
            cpu, wall = time.process_time(), time.perf_counter()
            list(pool.map(job, range(args.images)))
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        seen = sorted(set(batcher.batch_sizes))
        print(
            f"| {threads} | {args.images} | {wall:.2f} | {args.images / wall:.1f} | "
            f"{cpu / args.images * 1000:.1f} | {seen} |"
        )


def gil_check(jpeg: bytes, settings: Settings) -> None:
    """How freely another Python thread runs during each stage: a thread that only counts, holding the
    GIL between bytecodes. Near its rate beside a sleep = the stage releases the GIL; near its rate
    beside pure Python = it holds it."""
    rgb = decode_rgb(jpeg, max_pixels=settings.max_input_pixels, max_side=8192)
    mask = mask_at_size(null_probabilities((256, 256)), (rgb.shape[1], rgb.shape[0]))
    alpha8 = to_alpha8(mask)
    rgba = rgba_array(rgb, alpha8)
    count, stop = [0], threading.Event()

    def spin() -> None:
        while not stop.is_set():
            count[0] += 1

    spinner = threading.Thread(target=spin, daemon=True)
    spinner.start()

    def rate(fn) -> float:
        start, began = count[0], time.perf_counter()
        for _ in range(3):
            fn()
        return (count[0] - start) / (time.perf_counter() - began) / 1000

    rows = [
        ("sleep (releases the GIL)", lambda: time.sleep(0.1)),
        ("pure Python (holds the GIL)", lambda: sum(range(1_000_000))),
        ("decode", lambda: decode_rgb(jpeg, max_pixels=settings.max_input_pixels, max_side=8192)),
        ("preprocess", lambda: input_array(rgb, (1024, 1024))),
        ("refine", lambda: refine_colours(rgb, mask, alpha8)),
        ("encode", lambda: encode_png(rgba, settings.png_compress_level)),
    ]
    print("\n### GIL: iterations/ms of a counting Python thread while a stage runs (1 MP)\n")
    print("| stage | counter iterations per ms |")
    print("| --- | ---: |")
    for name, fn in rows:
        print(f"| {name} | {rate(fn):.0f} |")
    stop.set()
    spinner.join()


def forward_row(args, settings: Settings) -> None:
    resolution = parse_resolution(args.resolution)
    predictor = Predictor(VariantSpec(id="bench", weights="recipe", backbone=args.backbone), settings)
    predictor.load()
    prepared = [predictor.prepare(np.zeros((resolution[1], resolution[0], 3), np.uint8), resolution)]
    predictor.forward(prepared)
    cpu, wall = time.process_time(), time.perf_counter()
    predictor.forward(prepared)
    print(
        f"\nforward {args.backbone} {args.resolution} (recipe weights, for scale): CPU "
        f"{(time.process_time() - cpu) * 1000:.0f} ms, wall {(time.perf_counter() - wall) * 1000:.0f} ms"
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--resolution", default="1024x1024")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="*", default=[1, 2, 4], help="job threads (part 2)")
    parser.add_argument("--images", type=int, default=48, help="images per part-2 row")
    parser.add_argument("--torch-threads", type=int, default=2)
    parser.add_argument("--forward", action="store_true", help="also time one real forward (recipe weights)")
    parser.add_argument("--backbone", default="swin_v1_t")
    parser.add_argument("--skip-stages", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(args.torch_threads)
    settings = Settings(
        device="cpu", torch_threads=args.torch_threads, warmup_forward=False, max_input_side=8192
    )
    load = os.getloadavg()
    print(
        f"CPU: {cpu_model()}, {os.cpu_count()} CPUs; load average at start {load[0]:.2f} {load[1]:.2f} "
        f"{load[2]:.2f}; torch {torch.__version__}, {args.torch_threads} torch threads; "
        f"operating resolution {args.resolution}; stage figures: best of {args.repeats}\n"
    )
    photos = make_photos()
    if not args.skip_stages:
        stage_table(photos, args, settings)
    engine_throughput(photos["1024x1024 (1.0 MP)"], args, settings)
    gil_check(photos["1024x1024 (1.0 MP)"], settings)
    if args.forward:
        forward_row(args, settings)
    print(f"\nthreads alive: {threading.active_count()}; load average at end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
