"""Benchmark BiRefNet inference on CPU: forward time and peak memory per configuration.

Each configuration runs in a fresh subprocess (peak RSS is its own): build, recipe weights, optionally
``fuse_for_inference()``, warm up, median of a few forwards under ``torch.inference_mode``; "CPU s" is
process CPU time per forward. Prints a markdown table.

    .venv/bin/python bench/bench_model.py                       # Swin-T/L at 512 and 1024, fused, 2 threads
    .venv/bin/python bench/bench_model.py --modes reference fused --sizes 1024 --backbones swin_v1_t
    .venv/bin/python bench/bench_model.py --threads 1 2         # 1 thread: robust to a busy machine
    .venv/bin/python bench/bench_model.py --sizes 1024 --malloc retain default   # glibc keeps freed memory?
    .venv/bin/python bench/bench_model.py --official ~/src/BiRefNet --backbones swin_v1_t --sizes 512

``--official PATH``: a checkout of https://github.com/ZhengPeng7/BiRefNet you fetched yourself (with its own
requirements: einops, kornia, timm, opencv, tqdm). The official model then runs alternately with ours
(``--rounds``), each in a fresh process with the same input, recipe weights (by key), threads, allocator
and OpenMP policy; the table adds its figures, the ratios and the largest logit difference.

Children run with OMP_WAIT_POLICY=PASSIVE by default: on a shared machine spinning OpenMP threads wait at
every barrier for a descheduled partner (Swin-T 512: 7.5-8.1 s spinning vs 2.2 s passive under the same
load); on an idle machine it costs at most a futex wake-up per parallel region.
"""

from __future__ import annotations

import argparse
import ast
import itertools
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cpu_description() -> str:
    """The CPU as lscpu names it: model name, vendor, family/model/stepping, and AVX-512 or not."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor is enough
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        return platform.processor() or platform.machine()
    family, model = fields.get("cpu family", "?"), fields.get("model", "?")
    arch = microarchitecture(fields.get("vendor_id", ""), family, model)
    avx512 = "AVX-512" if "avx512f" in fields.get("flags", "").split() else "no AVX-512"
    return (
        f"{fields.get('model name', '?')} ({fields.get('vendor_id', '?')}, family {family} model {model} "
        f"stepping {fields.get('stepping', '?')}{', ' + arch if arch else ''}, {avx512})"
    )


def microarchitecture(vendor: str, family: str, model: str) -> str:
    """AMD's Zen generation from family/model (AMD's published family numbers); '' when unsure."""
    if vendor != "AuthenticAMD" or not family.isdigit() or not model.isdigit():
        return ""
    fam, mod = int(family), int(model)
    if fam == 0x17:
        return "Zen 2" if mod >= 0x30 else "Zen/Zen+"
    if fam == 0x19:
        return "Zen 4" if 0x10 <= mod <= 0x1F or 0x60 <= mod <= 0xAF else "Zen 3"
    if fam == 0x1A:
        return "Zen 5"
    return ""


def recipe_into(model, torch) -> None:
    """Recipe weights written in place (same values as load_state_dict(recipe_state_dict(model)), without
    holding a second copy of the weights, so peak RSS reflects inference). Keys are the official ones, so
    the official model gets exactly the same weights."""
    from worker.birefnet.recipe import COMPUTED_LEAVES, recipe_value

    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            if key.rsplit(".", 1)[-1] not in COMPUTED_LEAVES:
                tensor.copy_(torch.from_numpy(recipe_value(key, tensor.shape)))


def official_model(checkout: Path, backbone: str):
    """The official BiRefNet from the user's checkout, built with its own config.py, changing only the
    backbone (config.py picks it by list index; the source is adjusted in memory, no file is written)."""
    source = (checkout / "config.py").read_text()
    found = re.search(r"self\.bb\s*=\s*\[(.*?)\]\[(\d+)\]", source, re.S)
    if not found:
        raise SystemExit(f"{checkout}/config.py: no `self.bb = [...][i]` backbone choice found")
    names = ast.literal_eval("[" + re.sub(r"#.*", "", found.group(1)) + "]")
    if backbone not in names:
        raise SystemExit(f"the official config has no backbone {backbone!r} (it has {names})")
    start, end = found.span(2)
    config = types.ModuleType("config")
    config.__file__ = str(checkout / "config.py")
    exec(
        compile(source[:start] + str(names.index(backbone)) + source[end:], config.__file__, "exec"),
        config.__dict__,
    )
    sys.modules["config"] = config
    sys.path.insert(0, str(checkout))
    os.chdir(checkout)  # config.py reads train.sh from the working directory
    try:
        from models.birefnet import BiRefNet as Official
    except ImportError as exc:
        raise SystemExit(
            f"the official code needs its requirements ({exc}); e.g. pip install einops kornia "
            "timm opencv-python-headless tqdm"
        ) from exc
    return Official(bb_pretrained=False).eval()


def run_one(
    backbone: str,
    size: int,
    mode: str,
    threads: int,
    repeats: int,
    warmup: int,
    retain: bool,
    official: Path | None = None,
    save_output: str | None = None,
) -> dict:
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, str(REPO))
    if retain:  # as workers do by default (BIREFNET_RETAIN_FREED_MEMORY)
        from worker.allocator import retain_freed_memory

        retain_freed_memory()
    if official is not None:
        model = official_model(official, backbone)
    else:
        from worker.birefnet import BiRefNet, BiRefNetConfig

        model = BiRefNet(BiRefNetConfig(backbone=backbone)).eval()  # patch order einops, as official code
    recipe_into(model, torch)
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
    if isinstance(y, (list, tuple)):  # the official model returns a list; the last entry is the logits
        y = y[-1]
    assert y.shape == (1, 1, size, size)
    if save_output:
        import numpy as np

        np.save(save_output, y.float().numpy())
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
    ap.add_argument(
        "--official",
        type=Path,
        metavar="PATH",
        help="a checkout of github.com/ZhengPeng7/BiRefNet: run the official model side by side with ours",
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="with --official: ours and official alternate this many times per configuration "
        "(default 2); each side reports the median over its rounds",
    )
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--run-official", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--save-output", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:  # child process: one configuration, JSON on stdout
        res = run_one(
            args.backbones[0],
            args.sizes[0],
            args.modes[0],
            args.threads[0],
            args.repeats,
            args.warmup,
            args.malloc[0] == "retain",
            args.official if args.run_official else None,
            args.save_output,
        )
        print(json.dumps(res))
        return
    if args.official is not None:
        args.official = args.official.expanduser().resolve()
        if not (args.official / "models" / "birefnet.py").exists():
            raise SystemExit(f"--official {args.official}: not a BiRefNet checkout (no models/birefnet.py)")
    rounds = args.rounds or (2 if args.official else 1)
    outputs = Path(tempfile.mkdtemp(prefix="bench-model-"))

    load_before = os.getloadavg()
    rows = []
    for backbone in args.backbones:
        for size in args.sizes:
            for mode in args.modes:
                for threads, malloc in itertools.product(args.threads, args.malloc):
                    sides = ["ours", "official"] if args.official else ["ours"]
                    runs: dict[str, list[dict]] = {side: [] for side in sides}
                    for round_no, side in itertools.product(range(rounds), sides):
                        cmd = [
                            sys.executable, __file__, "--worker",
                            "--backbones", backbone, "--sizes", str(size),
                            "--modes", mode if side == "ours" else "reference", "--threads", str(threads),
                            "--repeats", str(args.repeats), "--warmup", str(args.warmup),
                            "--malloc", malloc, "--save-output", str(outputs / f"{side}.npy"),
                        ]  # fmt: skip
                        if side == "official":
                            cmd += ["--official", str(args.official), "--run-official"]
                        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
                        if args.omp_wait_policy != "default":
                            env["OMP_WAIT_POLICY"] = args.omp_wait_policy
                        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
                        if done.returncode != 0:
                            raise SystemExit(f"{side} run failed:\n{done.stdout}\n{done.stderr}")
                        res = json.loads(done.stdout.strip().splitlines()[-1])
                        runs[side].append(res)
                        print(
                            f"# {side} {backbone} {size} {mode if side == 'ours' else 'reference'} "
                            f"{threads}t "
                            f"malloc={malloc} round {round_no + 1}: "
                            f"{res['median_s']:.2f} s, {res['peak_rss_gib']:.2f} GiB",
                            file=sys.stderr,
                        )
                    row = summarise(runs["ours"])
                    if args.official:
                        row["official"] = summarise(runs["official"])
                        row["max_abs_diff"] = max_abs_diff(outputs / "ours.npy", outputs / "official.npy")
                    rows.append(row)
    load_after = os.getloadavg()

    policy = (
        args.omp_wait_policy
        if args.omp_wait_policy != "default"
        else os.environ.get("OMP_WAIT_POLICY", "unset")
    )
    import torch

    print(f"\nCPU: {cpu_description()}; {os.cpu_count()} CPUs visible; torch {torch.__version__}")
    print(f"CPU forward, batch 1, fp32, inference_mode, recipe weights, OMP_WAIT_POLICY={policy}")
    print(
        f"(median of {args.repeats} after {args.warmup} warm-up, fresh process per run, {rounds} round(s): "
        "each figure is the median over the rounds;"
    )
    print(
        f" 1-min load average {load_before[0]:.1f} before, {load_after[0]:.1f} after: other processes share "
        f"the CPU)"
    )
    if args.official:
        commit = (
            subprocess.run(
                ["git", "-C", str(args.official), "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
            ).stdout.strip()
            or "unknown commit"
        )
        print(
            f"official: {args.official} ({commit}), reference path, same input, weights, threads, malloc "
            "and OMP policy, alternating with ours"
        )
    print()
    head = [
        "backbone",
        "size",
        "path",
        "threads",
        "malloc",
        "median s",
        "min s",
        "CPU s",
        "peak RSS GiB",
        "RSS after load GiB",
    ]
    if args.official:
        head += [
            "official median s",
            "official CPU s",
            "official peak RSS GiB",
            "time ours/official",
            "CPU time ours/official",
            "memory ours/official",
            "max abs logit diff",
        ]
    print("| " + " | ".join(head) + " |")
    print("|" + " --- |" * len(head))
    for r in rows:
        cells = [
            r["backbone"],
            r["size"],
            r["mode"],
            r["threads"],
            "retain" if r["retain"] else "default",
            f"{r['median_s']:.2f}",
            f"{r['min_s']:.2f}",
            f"{r['cpu_s']:.2f}",
            f"{r['peak_rss_gib']:.2f}",
            f"{r['rss_after_load_gib']:.2f}",
        ]
        if args.official:
            off = r["official"]
            cells += [
                f"{off['median_s']:.2f}",
                f"{off['cpu_s']:.2f}",
                f"{off['peak_rss_gib']:.2f}",
                f"{r['median_s'] / off['median_s']:.2f}x",
                f"{r['cpu_s'] / off['cpu_s']:.2f}x",
                f"{r['peak_rss_gib'] / off['peak_rss_gib']:.2f}x",
                f"{r['max_abs_diff']:.1e}",
            ]
        print("| " + " | ".join(str(c) for c in cells) + " |")


def summarise(runs: list[dict]) -> dict:
    """One row from a side's rounds: medians of the rounds' medians, best min, largest peak RSS."""
    return {
        **runs[0],
        "median_s": statistics.median(r["median_s"] for r in runs),
        "cpu_s": statistics.median(r["cpu_s"] for r in runs),
        "min_s": min(r["min_s"] for r in runs),
        "peak_rss_gib": max(r["peak_rss_gib"] for r in runs),
        "rss_after_load_gib": max(r["rss_after_load_gib"] for r in runs),
    }


def max_abs_diff(a: Path, b: Path) -> float:
    import numpy as np

    return float(np.abs(np.load(a) - np.load(b)).max())


if __name__ == "__main__":
    main()
