"""Memory of one worker process that packs every fal model (v1: 3, v2: 6) into itself.

    python bench/bench_packed_worker.py [--share] [--device cpu|cuda]

Loads the variants as `python -m worker --variants <all>` does (worker.packing.load_predictors), with
recipe weights (published shapes, nothing downloaded), printing VmRSS after each (and CUDA memory on a GPU).
Without --share each variant gets its own network, as trained weights need (v1/v2 Portrait share one).
"""

from __future__ import annotations

import argparse
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout, not an installed copy


def rss_mib() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        return next(
            line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")
        )
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--share",
        action="store_true",
        help="share networks as the worker does by default "
        "(recipe weights then collapse to one network per backbone and patch order)",
    )
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    from common.domain.variants import BUILTIN_VARIANTS
    from common.settings import Settings

    fal_models = [v for v in BUILTIN_VARIANTS if v.fal_names]
    settings = Settings(
        device=args.device,
        worker_variants=tuple(v.id for v in fal_models),
        variant_overrides={v.id: {"weights": "recipe"} for v in fal_models},
        worker_share_networks=args.share,
        patch_order_check="off",
        weights_fallback="none",
    )
    import torch

    from worker.packing import load_predictors

    print(
        f"CPU: {cpu_model()}; torch {torch.__version__}; device {args.device}; share networks: {args.share}"
    )
    print(f"before loading: RSS {rss_mib():.0f} MiB")
    print("| variant | backbone | load s | RSS MiB after |")
    print("| --- | --- | --- | --- |")
    by_id = {v.id: v for v in fal_models}

    def ready(variant: str, predictor, seconds: float) -> None:
        print(f"| {variant} | {by_id[variant].backbone} | {seconds:.1f} | {rss_mib():.0f} |", flush=True)

    started = time.perf_counter()
    predictors = load_predictors(settings, on_ready=ready)
    networks = len({id(p) for p in predictors.values()})
    params = sum(
        sum(t.numel() for t in p.network.parameters())
        for p in {id(p): p for p in predictors.values()}.values()
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"\n{len(predictors)} variants, {networks} distinct networks ({params / 1e6:.0f} M parameters) "
        f"loaded in "
        f"{time.perf_counter() - started:.0f} s: RSS {rss_mib():.0f} MiB (peak {peak:.0f} MiB)"
    )
    if torch.cuda.is_available() and args.device.startswith("cuda"):
        print(
            f"CUDA allocated {torch.cuda.memory_allocated() / 2**20:.0f} MiB, "
            f"reserved {torch.cuda.memory_reserved() / 2**20:.0f} MiB"
        )


if __name__ == "__main__":
    main()
