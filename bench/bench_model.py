"""Benchmark BiRefNet inference on CPU: forward time and peak memory per configuration.

Each configuration runs in a fresh subprocess (so peak RSS, from ``resource.getrusage``, belongs
to that configuration alone): build the model, load recipe weights, optionally
``fuse_for_inference()``, warm up, then time a few forwards under ``torch.inference_mode`` and
report the median. Prints a markdown table.

    .venv/bin/python bench/bench_model.py                       # Swin-T/L at 512 and 1024, fused path
    .venv/bin/python bench/bench_model.py --modes reference fused --sizes 1024 --backbones swin_v1_t
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Official BiRefNet code measured on the same machine (1024x1024, fp32, 2 threads).
OFFICIAL = {("swin_v1_t", 1024): (7.70, 2.79), ("swin_v1_l", 1024): (18.19, 4.52)}


def run_one(backbone: str, size: int, mode: str, threads: int, repeats: int, warmup: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, str(REPO))
    from worker.birefnet import BiRefNet, BiRefNetConfig
    from worker.birefnet.recipe import COMPUTED_LEAVES, recipe_value

    model = BiRefNet(BiRefNetConfig(backbone=backbone)).eval()
    # Recipe weights written in place (same values as load_state_dict(recipe_state_dict(model)),
    # without holding a second copy of the weights, so peak RSS reflects inference).
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            if key.rsplit(".", 1)[-1] not in COMPUTED_LEAVES:
                tensor.copy_(torch.from_numpy(recipe_value(key, tensor.shape)))
    if mode == "fused":
        model.fuse_for_inference()
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            t0 = time.perf_counter()
            y = model(x)
            dt = time.perf_counter() - t0
            if i >= warmup:
                times.append(dt)
    assert y.shape == (1, 1, size, size)
    return {
        "backbone": backbone,
        "size": size,
        "mode": mode,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "rss_after_load_gib": rss_loaded,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", nargs="+", default=["swin_v1_t", "swin_v1_l"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[512, 1024])
    ap.add_argument("--modes", nargs="+", default=["fused"], choices=["fused", "reference"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:  # child process: one configuration, JSON on stdout
        res = run_one(
            args.backbones[0], args.sizes[0], args.modes[0], args.threads, args.repeats, args.warmup
        )
        print(json.dumps(res))
        return

    rows = []
    for backbone in args.backbones:
        for size in args.sizes:
            for mode in args.modes:
                cmd = [
                    sys.executable, __file__, "--worker", "--backbones", backbone, "--sizes", str(size),
                    "--modes", mode, "--threads", str(args.threads), "--repeats", str(args.repeats),
                    "--warmup", str(args.warmup),
                ]  # fmt: skip
                env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
                out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
                res = json.loads(out.strip().splitlines()[-1])
                rows.append(res)
                print(
                    f"# {backbone} {size} {mode}: {res['median_s']:.2f} s, {res['peak_rss_gib']:.2f} GiB",
                    file=sys.stderr,
                )

    print(f"\nCPU forward, batch 1, fp32, {args.threads} threads, inference_mode, recipe weights")
    print(f"(median of {args.repeats} after {args.warmup} warm-up; peak RSS of a fresh process)\n")
    print(
        "| backbone | size | path | median s | min s | peak RSS GiB | RSS after load GiB | vs official time | official s / GiB |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        off = OFFICIAL.get((r["backbone"], r["size"]))
        ratio = f"{r['median_s'] / off[0]:.2f}x" if off else "-"
        off_s = f"{off[0]:.2f} / {off[1]:.2f}" if off else "-"
        print(
            f"| {r['backbone']} | {r['size']} | {r['mode']} | {r['median_s']:.2f} | {r['min_s']:.2f} | "
            f"{r['peak_rss_gib']:.2f} | {r['rss_after_load_gib']:.2f} | {ratio} | {off_s} |"
        )


if __name__ == "__main__":
    main()
