"""Benchmark BiRefNet inference on CPU: forward time and peak memory per configuration.

Each configuration runs in a fresh subprocess (so peak RSS, from ``resource.getrusage``, belongs
to that configuration alone): build the model, load recipe weights, optionally
``fuse_for_inference()``, warm up, then time a few forwards under ``torch.inference_mode`` and
report the median. Prints a markdown table.

    .venv/bin/python bench/bench_model.py                       # Swin-T/L at 512 and 1024, fused, 2 threads
    .venv/bin/python bench/bench_model.py --modes reference fused --sizes 1024 --backbones swin_v1_t
    .venv/bin/python bench/bench_model.py --threads 1 2         # 1 thread: robust to a busy machine
    .venv/bin/python bench/bench_model.py --sizes 1024 --malloc retain default   # glibc keeping freed memory or not

"CPU s" is the process CPU time per forward. Children run with OMP_WAIT_POLICY=PASSIVE by
default: on a machine shared with other processes, spinning OpenMP threads wait at every
barrier for a descheduled partner (measured: Swin-T 512 took 7.5-8.1 s spinning vs 2.2 s
passive under the same load); on an idle machine it costs at most a futex wake-up per
parallel region.
"""

from __future__ import annotations

import argparse
import itertools
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


def run_one(
    backbone: str, size: int, mode: str, threads: int, repeats: int, warmup: int, retain: bool
) -> dict:
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, str(REPO))
    if retain:  # as workers do by default (BIREFNET_RETAIN_FREED_MEMORY)
        from worker.allocator import retain_freed_memory

        retain_freed_memory()
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
    times, cpu_times = [], []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            y = model(x)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if i >= warmup:
                times.append(dt)
                cpu_times.append(dc)
    assert y.shape == (1, 1, size, size)
    return {
        "backbone": backbone,
        "size": size,
        "mode": mode,
        "threads": threads,
        "retain": retain,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "cpu_s": statistics.median(cpu_times),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "rss_after_load_gib": rss_loaded,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", nargs="+", default=["swin_v1_t", "swin_v1_l"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[512, 1024])
    ap.add_argument("--modes", nargs="+", default=["fused"], choices=["fused", "reference"])
    ap.add_argument("--threads", nargs="+", type=int, default=[2])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument(
        "--omp-wait-policy",
        default="PASSIVE",
        choices=["PASSIVE", "ACTIVE", "default"],
        help="OMP_WAIT_POLICY of the child processes (PASSIVE: idle OpenMP threads sleep instead of "
        "spinning, which on a shared machine is 3x faster; 'default': leave the environment alone)",
    )
    ap.add_argument(
        "--malloc",
        nargs="+",
        default=["retain"],
        choices=["retain", "default"],
        help="retain: glibc keeps freed memory, as workers do (worker/allocator.py); default: glibc as is",
    )
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:  # child process: one configuration, JSON on stdout
        res = run_one(
            args.backbones[0], args.sizes[0], args.modes[0], args.threads[0], args.repeats, args.warmup,
            args.malloc[0] == "retain",
        )
        print(json.dumps(res))
        return

    load_before = os.getloadavg()
    rows = []
    for backbone in args.backbones:
        for size in args.sizes:
            for mode in args.modes:
                for threads, malloc in itertools.product(args.threads, args.malloc):
                    cmd = [
                        sys.executable, __file__, "--worker", "--backbones", backbone, "--sizes", str(size),
                        "--modes", mode, "--threads", str(threads), "--repeats", str(args.repeats),
                        "--warmup", str(args.warmup), "--malloc", malloc,
                    ]  # fmt: skip
                    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
                    if args.omp_wait_policy != "default":
                        env["OMP_WAIT_POLICY"] = args.omp_wait_policy
                    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
                    res = json.loads(out.strip().splitlines()[-1])
                    rows.append(res)
                    print(
                        f"# {backbone} {size} {mode} {threads}t malloc={malloc}: {res['median_s']:.2f} s, {res['peak_rss_gib']:.2f} GiB",
                        file=sys.stderr,
                    )
    load_after = os.getloadavg()

    policy = (
        args.omp_wait_policy
        if args.omp_wait_policy != "default"
        else os.environ.get("OMP_WAIT_POLICY", "unset")
    )
    print(
        f"\nCPU forward, batch 1, fp32, inference_mode, recipe weights, {os.cpu_count()} CPUs, "
        f"OMP_WAIT_POLICY={policy}"
    )
    print(f"(median of {args.repeats} after {args.warmup} warm-up; peak RSS of a fresh process per row;")
    print(
        f" 1-min load average {load_before[0]:.1f} before, {load_after[0]:.1f} after: other processes share the CPU)\n"
    )
    print(
        "| backbone | size | path | threads | malloc | median s | min s | CPU s | peak RSS GiB | RSS after load GiB "
        "| median vs official | official s / GiB |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        off = OFFICIAL.get((r["backbone"], r["size"]))
        ratio = f"{r['median_s'] / off[0]:.2f}x" if off and r["threads"] == 2 else "-"
        off_s = f"{off[0]:.2f} / {off[1]:.2f}" if off else "-"
        print(
            f"| {r['backbone']} | {r['size']} | {r['mode']} | {r['threads']} "
            f"| {'retain' if r['retain'] else 'default'} | {r['median_s']:.2f} | {r['min_s']:.2f} "
            f"| {r['cpu_s']:.2f} | {r['peak_rss_gib']:.2f} | {r['rss_after_load_gib']:.2f} | {ratio} | {off_s} |"
        )


if __name__ == "__main__":
    main()
