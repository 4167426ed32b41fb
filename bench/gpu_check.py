"""One prepared GPU check (<= 5 minutes on one GPU); exits cleanly with a message without CUDA.

First the worker's own start-up driver check (worker/cuda_driver.py: the NVIDIA driver found against the
floor of torch's CUDA build), as the worker image runs it; then the figures:

For Swin-T and Swin-L (recipe weights): float16/bfloat16 vs float32 logit and 8-bit mask differences;
forward ms and peak GPU memory at batch 1/2/4/8 at 1024² and 2048²; engine images/s end to end (1 MP JPEG
bytes -> cut-out + mask PNG on the device path) with N job threads around the batcher.

    python bench/gpu_check.py [--quick] [--threads 4 8] [--budget 300] [--video | --video-only]
"""

from __future__ import annotations

import argparse
import io
import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, nargs="*", default=[4, 8], help="job threads for part 3")
    parser.add_argument("--images", type=int, default=64, help="images per part-3 row")
    parser.add_argument(
        "--budget", type=float, default=290.0, help="seconds; later parts are skipped past it"
    )
    parser.add_argument("--quick", action="store_true", help="Swin-T only, 1024² only")
    parser.add_argument("--video", action="store_true", help="also the video part (video_part)")
    parser.add_argument("--video-only", action="store_true", help="the driver check and the video part only")
    args = parser.parse_args()
    import torch

    # 0. The driver floor, with the product's function (the worker calls it before loading any model).
    from worker.cuda_driver import DriverTooOld, read_driver_version, require_driver, torch_cuda_version

    print(
        f"### 0. Driver check: torch {torch.__version__} built for CUDA {torch_cuda_version()}, "
        f"NVIDIA driver found: {read_driver_version() or 'none'}\n"
    )
    try:
        result = require_driver("auto")
        print(
            f"driver check: OK: {result.message}\n"
            if result
            else "driver check: no NVIDIA driver (auto: CPU)\n"
        )
    except DriverTooOld as error:
        print(f"driver check: FAIL: {error}\n")
    if not torch.cuda.is_available():
        print(
            "gpu_check: CUDA is not available on this machine; nothing to measure. Run it on a GPU host:\n"
            "    python bench/gpu_check.py"
        )
        return 0
    logging.basicConfig(level=logging.WARNING)
    started = time.monotonic()
    if args.video_only:
        print(f"GPU: {torch.cuda.get_device_name(0)}; torch {torch.__version__}, CUDA {torch.version.cuda}")
        video_part()
        print(f"\nvideo part in {time.monotonic() - started:.0f} s")
        return 0

    def over_budget() -> bool:
        return time.monotonic() - started > args.budget

    from PIL import Image
    from skimage import data

    from common.domain.schemas import JobParams
    from common.domain.variants import VariantSpec
    from common.settings import Settings
    from worker.pipeline.decode import decode_rgb
    from worker.pipeline.postprocess import postprocess
    from worker.pipeline.render import render
    from worker.pipeline.types import EncodeOptions

    full_outputs = JobParams(output_format="png", output_mask=True, refine_foreground=True)
    from worker.batcher import MaskBatcher
    from worker.engine import Predictor

    print(f"GPU: {torch.cuda.get_device_name(0)}; torch {torch.__version__}, CUDA {torch.version.cuda}\n")
    backbones = ["swin_v1_t"] if args.quick else ["swin_v1_t", "swin_v1_l"]

    def predictor(backbone: str, dtype: str, **fields) -> Predictor:
        settings = Settings(
            device="cuda",
            inference_dtype=dtype,
            warmup_forward=False,
            max_batch_size=8,
            max_input_side=8192,
            **fields,
        )
        spec = VariantSpec(
            id=f"check-{backbone}",
            weights="recipe",
            backbone=backbone,
            allowed_resolutions=("1024x1024", "2048x2048"),
        )
        loaded = Predictor(spec, settings)
        loaded.load()
        return loaded

    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]

    # 1. precision ---------------------------------------------------------------------------------
    print("### 1. Half precision vs float32 (weights stored in the dtype), 1024², 4 photos\n")
    print(
        "| backbone | dtype | max abs logit diff | mean abs logit diff | mask pixels differing | max mask "
        "diff |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for backbone in backbones:
        torch.manual_seed(0)
        reference = predictor(backbone, "float32")
        state = {k: v.float().clone() for k, v in reference.network.state_dict().items()}
        prepared = [reference.prepare(photo, (1024, 1024)) for photo in photos]
        logits32 = torch.stack(reference.forward(prepared)).float()
        del reference
        for dtype in ("float16", "bfloat16"):
            half = Predictor(
                VariantSpec(id=f"check-{backbone}", weights="recipe", backbone=backbone),
                Settings(
                    device="cuda",
                    inference_dtype=dtype,
                    warmup_forward=False,
                    max_batch_size=8,
                    fused_inference=False,
                ),
            )
            half.load()
            half.network.load_state_dict(
                {k: v.to(half.network.state_dict()[k].dtype) for k, v in state.items()}, strict=False
            )
            if hasattr(half.network, "fuse_for_inference"):
                half.network.fuse_for_inference()
            try:
                logits = torch.stack(half.forward(prepared)).float()
            except (RuntimeError, NotImplementedError) as error:  # a dtype the network cannot run: say so
                print(f"| {backbone} | {dtype} | failed: {str(error).splitlines()[0][:80]} | | | |")
                del half
                continue
            diff = (logits - logits32).abs()
            mask_diff = ((logits.sigmoid() * 255).round() - (logits32.sigmoid() * 255).round()).abs()
            print(
                f"| {backbone} | {dtype} | {diff.max():.4f} | {diff.mean():.5f} | "
                f"{(mask_diff > 0).float().mean() * 100:.3f} % | {mask_diff.max():.0f} |"
            )
            del half
            torch.cuda.empty_cache()

    # 2. forward speed and memory ------------------------------------------------------------------
    print("\n### 2. Forward ms (float16 weights, channels_last, median of 5) and peak GPU memory\n")
    print("| backbone | resolution | batch | ms per forward | ms per image | peak GPU memory |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    resolutions = [(1024, 1024)] if args.quick else [(1024, 1024), (2048, 2048)]
    for backbone in backbones:
        model = predictor(backbone, "float16")
        for width, height in resolutions:
            for batch in (1, 2, 4, 8):
                if over_budget():
                    print("| (budget reached) | | | | | |")
                    break
                try:
                    x = torch.zeros(batch, 3, height, width, device="cuda")
                    torch.cuda.reset_peak_memory_stats()
                    model._forward(x)
                    times = []
                    for _ in range(5):
                        t = time.perf_counter()
                        model._forward(x)
                        times.append(time.perf_counter() - t)
                    ms = sorted(times)[2] * 1000
                    peak = torch.cuda.max_memory_allocated() / 2**30
                    print(
                        f"| {backbone} | {width}x{height} | {batch} | {ms:.1f} | {ms / batch:.1f} | "
                        f"{peak:.2f} GiB |"
                    )
                except torch.cuda.OutOfMemoryError:
                    print(f"| {backbone} | {width}x{height} | {batch} | out of memory | | |")
                    torch.cuda.empty_cache()
                    break
        del model
        torch.cuda.empty_cache()

    # 3. end to end --------------------------------------------------------------------------------
    print("\n### 3. Engine end to end: 1 MP JPEG bytes -> cut-out + mask PNG (refine on), float16, 1024²\n")
    print("| backbone | job threads | images | images/s | batch sizes seen |")
    print("| --- | ---: | ---: | ---: | --- |")
    buffer = io.BytesIO()
    Image.fromarray(data.astronaut()).resize((1024, 1024), Image.Resampling.BICUBIC).save(
        buffer, "JPEG", quality=90
    )
    jpeg = buffer.getvalue()
    for backbone in backbones:
        if over_budget():
            print("| (budget reached) | | | | |")
            break
        model = predictor(backbone, "float16")
        model._forward(torch.zeros(8, 3, 1024, 1024, device="cuda"))
        for threads in args.threads:
            batcher = MaskBatcher(model, max_size=8, wait_seconds=0.005)

            def job(_: int, batcher: MaskBatcher = batcher, model: Predictor = model) -> int:
                rgb = decode_rgb(jpeg, max_pixels=64_000_000, max_side=8192)
                prepared = model.prepare(rgb, (1024, 1024))
                logits, _ = batcher.infer(prepared)
                return render(
                    rgb,
                    postprocess(logits, prepared),
                    full_outputs,
                    encoding=EncodeOptions.from_settings(model.settings),
                ).image.file_size

            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(job, range(threads)))
                t = time.perf_counter()
                list(pool.map(job, range(args.images)))
                seconds = time.perf_counter() - t
            print(
                f"| {backbone} | {threads} | {args.images} | {args.images / seconds:.1f} | "
                f"{sorted(set(batcher.batch_sizes))} |"
            )
        del model
        torch.cuda.empty_cache()
    if args.video and not over_budget():
        video_part()
    print(f"\nall parts in {time.monotonic() - started:.0f} s")
    return 0


def video_part(seconds: float = 2.0) -> None:
    """Video frames/s on the device: the whole video pipeline (bench/bench_video.py's per-worker row: decode,
    batcher, mask, refine, H.264 encode) for a 1080p clip: null model, Swin-T recipe weights, and Swin-T
    without refinement."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import tempfile

    import bench_video

    path = bench_video.clip(str(Path(tempfile.gettempdir()) / f"gpu-1080p-{seconds}.mp4"), "1080p", seconds)
    print("\n### Video: frames/s per worker, 1080p clip, batch 8, MP4 out\n")
    print(
        "| model | operating res. | frames | wall s | frames/s | peak RSS MB | mean batch "
        "| ms per frame by stage (summed over the frame threads) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    rows = (("null", ()), ("swin_v1_t", ()), ("swin_v1_t", ("--no-refine",)))
    for model, flags in rows:
        got = bench_video.spawn("--clip", path, "--model", model, "--batch", "8", "--threads", "1", *flags)
        stages = ", ".join(f"{name} {ms:.1f}" for name, ms in got["stage_ms"].items())
        print(
            f"| {' '.join((model, *flags))} | 1024 | {got['frames']} | {got['seconds']:.2f} | "
            f"{got['fps']:.2f} | {got['peak_mb']:.0f} | {got['mean_batch']:.1f} | {stages} |"
        )


if __name__ == "__main__":
    sys.exit(main())
