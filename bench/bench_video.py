"""Video pipeline throughput and memory on this machine: frames/s per worker (decode -> batcher -> mask ->
refine -> encode, no Redis or S3), with the null model (the pipeline's own cost) and with Swin-T recipe
weights (untrained, the real network's cost); one video split in two halves on 2 worker processes vs
1; peak memory vs duration. Each row runs in a fresh process (clean peak RSS). Prints markdown tables.

    python bench/bench_video.py [--quick] [--skip-swin]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = {"480p": (854, 480), "1080p": (1920, 1080)}


def clip(path: str, size: str, seconds: float, fps: int = 24) -> str:
    from devstack.clips import make_clip

    width, height = SIZES[size]
    if not os.path.exists(path):
        make_clip(path, width=width, height=height, seconds=seconds, fps=fps)
    return path


def row(args: argparse.Namespace) -> dict:
    """One measurement in this process: encode [start, end) of the clip through a warm predictor."""
    import torch

    from common.domain.schemas import JobParams
    from common.domain.variants import VariantSpec
    from common.domain.video import VideoOptions
    from common.settings import Settings
    from worker.batcher import MaskBatcher
    from worker.engine import Predictor
    from worker.run_overrides import RunOverrides
    from worker.video import codec
    from worker.video.job import VideoRun

    null = args.model == "null"
    settings = Settings(torch_threads=args.threads, max_batch_size=args.batch, benchmark_null_model=null)
    spec = VariantSpec(id="bench", weights="recipe", backbone="swin_v1_t")
    predictor = Predictor(spec, settings)
    predictor.load()
    res = args.resolution
    store = SimpleNamespace(cancel_requested=lambda _rid: False)
    batcher = MaskBatcher(predictor, max_size=args.batch, wait_seconds=0.005)
    runner = SimpleNamespace(
        settings=settings,
        store=store,
        batchers={"bench": batcher},
        overrides=RunOverrides.model_construct(operating_resolution=f"{res}x{res}"),
    )
    job = SimpleNamespace(
        request_id="bench",
        variant="bench",
        extra={},
        params=JobParams(operating_resolution="1024x1024", refine_foreground=not args.no_refine),
    )
    kind = codec.OUTPUT_KINDS[args.output]
    run = VideoRun(
        runner,
        job,
        "",
        predictor,
        lambda *_: None,
        time.monotonic() + 3600,  # type: ignore[arg-type]
        VideoOptions(output_type=args.output),
        kind,
    )
    run.source = args.clip
    run.info = codec.probe(args.clip, max_seconds=1e9, max_pixels=10**9)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        frames = run.encode_range(
            args.start,
            args.end,
            {"video": f"{tmp}/out{kind.extension}"},
            audio=args.end is None,
            segment=args.end is not None,
        )
        wall = time.perf_counter() - started
    return {
        "frames": frames,
        "seconds": wall,
        "stage_ms": {name: 1000 * value / max(1, frames) for name, value in run.stages.seconds.items()},
        "fps": frames / wall,
        "mean_batch": sum(batcher.batch_sizes) / max(1, len(batcher.batch_sizes)),
        "torch": torch.__version__,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def spawn(*extra: str) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--row", *extra], capture_output=True, text=True, cwd=ROOT, check=False
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("ROW ")]
    if not lines:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(lines[-1][4:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--row", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--clip", default="")
    parser.add_argument("--model", default="null")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--output", default="X264 (.mp4)")
    parser.add_argument("--start", type=float, default=0.0)
    parser.add_argument("--end", type=float, default=None)
    parser.add_argument("--quick", action="store_true", help="shorter clips")
    parser.add_argument("--skip-swin", action="store_true")
    parser.add_argument("--no-refine", action="store_true", help="cut-outs without foreground refinement")
    args = parser.parse_args()
    if args.row:
        print("ROW " + json.dumps(row(args)))
        return
    tmp = Path(tempfile.gettempdir()) / "birefnet-bench-video"
    tmp.mkdir(exist_ok=True)
    seconds = 1.0 if args.quick else 2.0
    print(
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; clips: moving square "
        f"over a gradient with audio, 24 fps, H.264 in\n"
    )
    print("### Frames/s per worker (one process, batch 4, 2 torch threads; MP4 out, refine on)\n")
    print("| model | operating res. | clip | frames | wall s | frames/s | peak RSS MB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    cases = [("null", 1024, "480p", seconds), ("null", 1024, "1080p", seconds)]
    if not args.skip_swin:
        cases += [("swin_v1_t", 1024, "480p", 0.25), ("swin_v1_t", 1024, "1080p", 0.25)]
    stage_rows = []
    for model, res, size, secs in cases:
        path = clip(str(tmp / f"{size}-{secs}.mp4"), size, secs)
        got = spawn("--clip", path, "--model", model, "--resolution", str(res))
        print(
            f"| {model} | {res} | {size} {secs}s | {got['frames']} | {got['seconds']:.2f} | {got['fps']:.2f} "
            f"| {got['peak_mb']:.0f} |"
        )
        stage_rows.append((model, size, got["stage_ms"]))

    # The per-frame stages as the image path's are measured: time per frame in each, summed over the
    # frame threads (which overlap), so a row's sum exceeds wall time per frame when threads run at once.
    names = ("decode", "prepare", "forward", "postprocess", "render", "encode")
    print("\n### Per-frame stages (ms per frame, summed over the frame threads; forward includes the wait")
    print("for its batch)\n")
    print("| model | clip | " + " | ".join(names) + " |")
    print("| --- | --- | " + " | ".join("---:" for _ in names) + " |")
    for model, size, stages in stage_rows:
        print(f"| {model} | {size} | " + " | ".join(f"{stages.get(n, 0.0):.1f}" for n in names) + " |")

    print("\n### One video on 2 worker processes (two halves, as two segments) vs 1 (null model, 480p)\n")
    path = clip(str(tmp / f"480p-{2 * seconds}.mp4"), "480p", 2 * seconds)
    started = time.perf_counter()
    one = spawn("--clip", path, "--threads", "1")
    one_wall = time.perf_counter() - started
    half = seconds
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--row",
                "--clip",
                path,
                "--threads",
                "1",
                "--start",
                str(a),
                "--end",
                str(b),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            cwd=ROOT,
        )
        for a, b in ((0.0, half), (half, 2 * seconds + 1))
    ]
    for proc in procs:
        proc.communicate()
    two_wall = time.perf_counter() - started
    print("| workers | frames | wall s (process start included) | frames/s |")
    print("| --- | --- | --- | --- |")
    print(f"| 1 | {one['frames']} | {one_wall:.2f} | {one['frames'] / one_wall:.2f} |")
    print(f"| 2 | {one['frames']} | {two_wall:.2f} | {one['frames'] / two_wall:.2f} |")

    print("\n### Peak memory vs duration (null model, 480p, one process)\n")
    print("| duration s | frames | peak RSS MB |")
    print("| --- | --- | --- |")
    for secs in (seconds, 2 * seconds, 4 * seconds):
        path = clip(str(tmp / f"480p-{secs}.mp4"), "480p", secs)
        got = spawn("--clip", path)
        print(f"| {secs:g} | {got['frames']} | {got['peak_mb']:.0f} |")


if __name__ == "__main__":
    main()
