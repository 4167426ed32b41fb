"""Load on this machine: N requests through the fal-compatible gateway, two workers, all must complete.

A loopback stack (devstack/loopback.py; nano workers, forward passes at 128x128): a burst
of `--jobs` requests (small PNG data URIs with webhooks) from `--concurrency` threads (throughput = jobs /
(last completion − first submit)), then `--paced-jobs` at 70 % of that throughput, so latency is the
system's, not the backlog's. Checks every job completed OK with exactly one webhook; prints markdown tables.

    python bench/bench_load.py [--jobs 1000] [--workers 2] [--concurrency 8] [--paced-jobs 200]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from devstack.load import run_load  # noqa: E402
from devstack.loopback import LoopbackStack  # noqa: E402
from devstack.receiver import WebhookReceiver  # noqa: E402
from devstack.services import MotoServer  # noqa: E402


def check(figures: dict) -> None:
    jobs = figures["jobs"]
    assert figures["ok"] == jobs, f"{jobs - figures['ok']} jobs did not succeed"
    assert figures["webhooks_per_job"] == [(1, jobs)], f"webhooks per job: {figures['webhooks_per_job']}"


def row(name: str, figures: dict) -> str:
    lat, hook, run = figures["latency"], figures["webhook_latency"], figures["run"]
    return (
        f"| {name} | {figures['jobs']} | {figures['seconds']:.1f} | {figures['throughput']:.2f} | "
        f"{lat['p50']:.2f} / {lat['p95']:.2f} / {lat['max']:.2f} | {hook['p50']:.2f} / {hook['p95']:.2f} | "
        f"{run['p50']:.2f} / {run['p95']:.2f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=8, help="client threads submitting")
    parser.add_argument("--paced-jobs", type=int, default=200, help="0: skip the paced run")
    args = parser.parse_args()
    receiver = WebhookReceiver().start()
    with MotoServer() as moto, tempfile.TemporaryDirectory(prefix="bench-load-") as logs:
        stack = LoopbackStack(Path(logs), moto.url)
        try:
            stack.start(workers=args.workers, producer=False)
            burst = run_load(stack, receiver, args.jobs, concurrency=args.concurrency, timeout=3600)
            check(burst)
            paced = None
            if args.paced_jobs:
                rate = round(0.7 * burst["throughput"], 2)
                paced = run_load(
                    stack, receiver, args.paced_jobs, concurrency=args.concurrency, rate=rate, timeout=3600
                )
                check(paced)
        finally:
            stack.close()
            receiver.stop()
    print(
        f"load benchmark: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"{args.workers} workers (nano BiRefNet, recipe weights, forward pass at 128x128 on CPU, 1 torch "
        f"thread each), gateway + webhook deliverer, Redis AOF fsync always, moto S3\n"
    )
    print(
        "| run | jobs | seconds | jobs/s | submit → COMPLETED p50 / p95 / max (s) | submit → webhook "
        "p50 / p95 (s) | worker run p50 / p95 (s) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print(row(f"burst ({args.concurrency} clients)", burst))
    if paced:
        print(row(f"paced at {paced['rate']} jobs/s", paced))
    print("\nevery job completed OK with exactly one webhook")


if __name__ == "__main__":
    main()
