"""Gateway overhead on this machine: submit→COMPLETED around the nano model, and status-poll throughput.

On the loopback stack of bench/benchstack.py (nano, recipe weights): `--jobs` sequential v2 requests
polled every 10 ms (overhead = client total − the worker's claim → completion), then one completed
request's status polled by N concurrent keep-alive clients for `--seconds` each. Prints markdown tables.

    python bench/bench_gateway.py [--jobs 50] [--seconds 5] [--pollers 1,4,16] [--resolution 256x256]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import platform
import statistics
import time

import httpx
from benchstack import KEY, completed, worker_and_gateway
from PIL import Image

from common.state.jobs import JobStore

STATUS = "/queue/fal-ai/birefnet/requests/{rid}/status"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def image_uri() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (96, 64), (180, 40, 40)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def run_jobs(client: httpx.Client, store: JobStore, count: int) -> dict[str, list[float]]:
    body = {"image_url": image_uri()}
    rows: dict[str, list[float]] = {"total": [], "worker": [], "queued": [], "overhead": [], "submit": []}
    for _ in range(count):
        record, submit, total = completed(client, store, "/queue/fal-ai/birefnet/v2", body)
        worker = (record.completed_at or 0) - (record.started_at or 0)
        rows["total"].append(total)
        rows["worker"].append(worker)
        rows["queued"].append((record.started_at or 0) - record.created_at)
        rows["overhead"].append(total - worker)
        rows["submit"].append(submit)
    return rows


async def poll(port: int, rid: str, pollers: int, seconds: float) -> tuple[float, list[float]]:
    """N keep-alive connections, each GETting the status in a loop. A minimal raw HTTP/1.1 client, so the
    load generator (same 2 cores) takes little CPU from the gateway it measures."""
    request = (
        f"GET {STATUS.format(rid=rid)}?logs=1 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Authorization: Key {KEY}\r\n\r\n"
    ).encode()
    latencies: list[float] = []
    stop = time.perf_counter() + seconds

    async def one() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.perf_counter() < stop:
                began = time.perf_counter()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200"), head[:40]
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                latencies.append(time.perf_counter() - began)
        finally:
            writer.close()

    began = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(pollers)))
    return len(latencies) / (time.perf_counter() - began), latencies


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--pollers", default="1,4,16")
    parser.add_argument(
        "--resolution",
        default="",
        help="run the network at WxH instead of the request's "
        "1024x1024 (BIREFNET_TEST_OPERATING_RESOLUTION; the overhead does not depend on it)",
    )
    args = parser.parse_args()
    overrides = {
        "BIREFNET_TEST_OPERATING_RESOLUTION": args.resolution,
        "BIREFNET_MASK_CACHE_SECONDS": "0",
    }  # the same image every time: run the network every time
    with worker_and_gateway("gateway", "swin_v1_nano", overrides, 180) as bs:
        with httpx.Client(base_url=bs.url, headers={"Authorization": f"Key {KEY}"}, timeout=120) as client:
            run_jobs(client, bs.store, 1)  # warm-up: first forward pass, connections
            rows = run_jobs(client, bs.store, args.jobs)
            record = completed(
                client, bs.store, "/queue/fal-ai/birefnet/v2", {"image_url": image_uri()}, 0.05
            )[0]
            rid = record.request_id

        print(
            f"gateway benchmark: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"nano BiRefNet (recipe weights) at {args.resolution or '1024x1024'} on CPU, 1 worker, "
            "1 gateway process (uvicorn)\n"
        )
        if args.jobs:
            print(f"submit → COMPLETED, {args.jobs} sequential jobs, status polled every 10 ms\n")
            print("| seconds | p50 | p95 | mean |")
            print("| --- | --- | --- | --- |")
            for name, label in (
                ("submit", "submit call"),
                ("queued", "queued (submit → worker claim)"),
                ("worker", "worker (claim → completed)"),
                ("total", "total (client)"),
                ("overhead", "**overhead** (total − worker)"),
            ):
                values = rows[name]
                print(
                    f"| {label} | {percentile(values, 0.5):.3f} | {percentile(values, 0.95):.3f} | "
                    f"{statistics.mean(values):.3f} |"
                )
        print(
            f"\nstatus polls (GET .../status?logs=1 of a completed request, keep-alive), {args.seconds:g} s "
            f"each\n"
        )
        print("| concurrent pollers | requests/s | p50 ms | p99 ms |")
        print("| --- | --- | --- | --- |")
        for pollers in (int(p) for p in args.pollers.split(",")):
            rate, latencies = asyncio.run(poll(bs.port, rid, pollers, args.seconds))
            print(
                f"| {pollers} | {rate:.0f} | {percentile(latencies, 0.5) * 1000:.1f} | "
                f"{percentile(latencies, 0.99) * 1000:.1f} |"
            )


if __name__ == "__main__":
    main()
