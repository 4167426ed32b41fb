"""Mask reuse against a full job: what a new background costs when the network does not run again.

On the loopback stack of bench/benchstack.py, one photo-sized input (`--size`), submit → COMPLETED (status
polled every 10 ms) and the worker's claim → completion for: a full job (new bytes: the content cache
misses), the same bytes again (content cache), compose through the queue and compose through /run, all
asking for the same rendering (background colour, PNG). Recipe weights. Prints a markdown table.

    python bench/bench_compose.py [--backbone swin_v1_t] [--resolution 1024x1024] [--repeats 3]
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import statistics
import time

import httpx
import numpy as np
from benchstack import KEY, completed, cpu_model, worker_and_gateway
from PIL import Image

from common.state.jobs import JobStore

REQ = "/queue/fal-ai/birefnet/requests"
OPTIONS = {"background_color": "#f4e1c1", "output_format": "png"}


def photo(size: tuple[int, int], variant: int) -> str:
    from skimage import data as samples

    image = Image.fromarray(samples.chelsea()).resize(size, Image.Resampling.BICUBIC)
    pixels = np.asarray(image).copy()
    pixels[0, 0, 0] = variant % 256  # new bytes: a content-cache miss
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def timed(client: httpx.Client, store: JobStore, path: str, body: dict) -> tuple[str, float, float]:
    """(request id, client seconds submit → COMPLETED, worker seconds claim → completion)."""
    record, _, total = completed(client, store, path, body)
    return record.request_id, total, (record.completed_at or 0) - (record.started_at or 0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--backbone", default="swin_v1_t", help="swin_v1_t (BiRefNet_lite), swin_v1_l, swin_v1_nano"
    )
    parser.add_argument("--resolution", default="1024x1024", help="operating resolution of the full jobs")
    parser.add_argument("--size", default="1024x768", help="input image WxH")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    resolution = "" if args.resolution == "1024x1024" else args.resolution
    rows: dict[str, list[tuple[float, float]]] = {"full": [], "cache": [], "compose": [], "run": []}
    with (
        worker_and_gateway(
            "compose", args.backbone, {"BIREFNET_TEST_OPERATING_RESOLUTION": resolution}, 600
        ) as bs,
        httpx.Client(base_url=bs.url, headers={"Authorization": f"Key {KEY}"}, timeout=600) as client,
    ):
        v2 = "/queue/fal-ai/birefnet/v2"
        source, _, _ = timed(client, bs.store, v2, {"image_url": photo(size, 1), **OPTIONS})  # warm-up
        timed(client, bs.store, f"{REQ}/{source}/compose", OPTIONS)
        for n in range(args.repeats):
            image = photo(size, 10 + n)
            rows["full"].append(timed(client, bs.store, v2, {"image_url": image, **OPTIONS})[1:])
            rows["cache"].append(timed(client, bs.store, v2, {"image_url": image, **OPTIONS})[1:])
            rows["compose"].append(timed(client, bs.store, f"{REQ}/{source}/compose", OPTIONS)[1:])
            started = time.perf_counter()
            response = client.post(f"/run/fal-ai/birefnet/requests/{source}/compose", json=OPTIONS)
            response.raise_for_status()
            rows["run"].append((time.perf_counter() - started, float("nan")))

    print(
        f"compose benchmark: {cpu_model()}, {os.cpu_count()} CPUs, {args.backbone} (recipe weights) at "
        f"{args.resolution} on CPU, {args.size} PNG input, background colour + PNG output, "
        f"median of {args.repeats}\n"
    )
    print("| request | submit → COMPLETED | worker | vs full job |")
    print("| --- | ---: | ---: | ---: |")
    full = statistics.median(total for total, _ in rows["full"])
    labels = {
        "full": "full job (network runs)",
        "cache": "same bytes again (content cache)",
        "compose": "compose, queue",
        "run": "compose, /run (sync)",
    }
    for name, label in labels.items():
        total = statistics.median(t for t, _ in rows[name])
        workers = [w for _, w in rows[name] if w == w]
        worker = f"{statistics.median(workers):.3f} s" if workers else "–"
        print(f"| {label} | {total:.3f} s | {worker} | {total / full:.2f}× |")


if __name__ == "__main__":
    main()
