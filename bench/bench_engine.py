"""Time every stage around the forward pass, as a worker job runs them, for two photo sizes.

Stages: decode (JPEG bytes -> RGB), preprocess (resize + normalise), forward, postprocess
(sigmoid + resize the mask back), refine (blur-fusion foreground colours), compose (RGBA) and
encode (PNG). Photos: a 1024x1024 and a 4000x3000 (12 MP) JPEG, upscaled from skimage samples.
Recipe weights (untrained: only the timing means anything), float32, CPU. Prints a markdown table
of the median over `--repeats` runs.

    .venv/bin/python bench/bench_engine.py                        # swin_v1_t, 2 threads, 1024x1024
    .venv/bin/python bench/bench_engine.py --backbone swin_v1_l --repeats 3 --png-levels 1 6
"""

from __future__ import annotations

import argparse
import io
import logging
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from skimage import data

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.settings import Settings  # noqa: E402
from common.variants import VariantSpec  # noqa: E402
from worker.engine import Predictor, StageTimings, parse_resolution  # noqa: E402
from worker.imaging import compose_cutout, decode_image, encode_image  # noqa: E402

STAGES = ("decode", "preprocess", "forward", "postprocess", "refine", "compose", "encode")


def make_photos() -> dict[str, bytes]:
    photos = {
        "1024x1024 (1.0 MP)": Image.fromarray(data.astronaut()).resize((1024, 1024), Image.Resampling.BICUBIC),
        "4000x3000 (12 MP)": Image.fromarray(data.chelsea()).resize((4000, 3000), Image.Resampling.BICUBIC),
    }
    encoded = {}
    for name, image in photos.items():
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        encoded[name] = buffer.getvalue()
    return encoded


def run_job(predictor: Predictor, jpeg: bytes, resolution: tuple[int, int], settings: Settings) -> StageTimings:
    timings = StageTimings()
    with timings.stage("decode"):
        image = decode_image(jpeg, max_pixels=settings.max_input_pixels)
    (mask,) = predictor.predict_masks([image], resolution, timings=timings)
    predictor.render_outputs(image, mask, output_format="png", output_mask=False, refine_foreground=True,
                             mask_only=False, timings=timings)
    return timings


def time_png_level(jpeg: bytes, level: int, settings: Settings) -> float:
    image = decode_image(jpeg, max_pixels=settings.max_input_pixels)
    cutout = compose_cutout(image, torch.rand(image.height, image.width).numpy(), refine=False)
    started = time.perf_counter()
    encode_image(cutout, "png", png_compress_level=level)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="swin_v1_t")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--resolution", default="1024x1024")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--png-levels", type=int, nargs="*", default=[], help="extra rows: PNG encode at these levels")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)

    torch.set_num_threads(args.threads)
    settings = Settings(device="cpu", torch_threads=args.threads, warmup_forward=False)
    spec = VariantSpec(id="bench", weights="recipe", backbone=args.backbone)
    resolution = parse_resolution(args.resolution)
    predictor = Predictor(spec, settings)
    started = time.perf_counter()
    predictor.load()
    load_seconds = time.perf_counter() - started
    photos = make_photos()
    predictor.predict_masks([Image.new("RGB", resolution)], resolution)  # warm-up at the real size

    medians: dict[str, dict[str, float]] = {}
    for name, jpeg in photos.items():
        runs = [run_job(predictor, jpeg, resolution, settings).seconds for _ in range(args.repeats)]
        medians[name] = {stage: statistics.median(run.get(stage, 0.0) for run in runs) for stage in STAGES}
        for level in args.png_levels:
            medians[name][f"encode png level {level}"] = time_png_level(jpeg, level, settings)

    names = list(photos)
    print(f"BiRefNet engine stages: {args.backbone}, recipe weights, operating resolution {args.resolution}, "
          f"float32, CPU, {args.threads} threads, torch {torch.__version__}, PNG level {settings.png_compress_level}, "
          f"median of {args.repeats}; model load {load_seconds:.1f}s\n")
    print("| stage | " + " | ".join(names) + " |")
    print("| --- |" + " ---: |" * len(names))
    for stage in medians[names[0]]:
        print(f"| {stage} | " + " | ".join(f"{medians[n][stage]:.3f} s" for n in names) + " |")
    totals = [sum(medians[n][s] for s in STAGES) for n in names]
    print("| **total** | " + " | ".join(f"**{total:.3f} s**" for total in totals) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
