"""Images/s at batch 1 vs batch N with the tiny (nano) architecture, on this machine's CPU.

Two views: the engine alone (`predict_masks` with N images), and the worker's batcher fed by N job
threads (the path a worker with BIREFNET_WORKER_CONCURRENCY=N takes). Prints a markdown table.

    python bench/bench_batching.py [--resolution 512] [--images 32] [--threads 2]
"""

from __future__ import annotations

import argparse
import platform
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from PIL import Image
from skimage import data as samples

from common.domain.variants import VariantSpec
from common.settings import Settings
from worker.batcher import MaskBatcher
from worker.engine import Predictor


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", default="1,2,4,8")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.batches.split(",")]
    settings = Settings(torch_threads=args.threads, max_batch_size=max(sizes))
    predictor = Predictor(VariantSpec(id="nano", weights="recipe", backbone="swin_v1_nano"), settings)
    predictor.load()
    photo = Image.fromarray(samples.astronaut())
    images = [photo] * args.images
    res = (args.resolution, args.resolution)
    predictor.predict_masks(images[:2], res)  # warm-up

    print(
        f"nano BiRefNet, {args.resolution}x{args.resolution}, {args.images} images, "
        f"{args.threads} torch threads, {platform.processor() or platform.machine()}, torch "
        f"{torch.__version__}\n"
    )
    print("| batch | engine images/s | batcher (N job threads) images/s | mean batch seen |")
    print("| --- | --- | --- | --- |")
    for size in sizes:
        started = time.perf_counter()
        for start in range(0, len(images), size):
            predictor.predict_masks(images[start : start + size], res)
        engine_rate = len(images) / (time.perf_counter() - started)

        batcher = MaskBatcher(predictor, max_size=size, wait_seconds=0.01)
        started = time.perf_counter()
        with ThreadPoolExecutor(size) as pool:
            list(pool.map(batcher.predict, images, [res] * len(images)))
        batcher_rate = len(images) / (time.perf_counter() - started)
        seen = sum(batcher.batch_sizes) / max(1, len(batcher.batch_sizes))
        print(f"| {size} | {engine_rate:.2f} | {batcher_rate:.2f} | {seen:.1f} |")


if __name__ == "__main__":
    main()
