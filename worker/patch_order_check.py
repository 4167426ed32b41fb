"""Which decoder patch order does a checkpoint use? Compare mask confidence under both.

    python -m worker.patch_order_check --weights hf://ZhengPeng7/BiRefNet@<rev>/model.safetensors \\
        --backbone swin_v1_l photo1.jpg photo2.jpg ...

A trained BiRefNet is confident on real photos: most pixels are clearly foreground or clearly
background. Run with the wrong patch channel order it gets scrambled image-patch features and
its masks turn hesitant. Confidence here is mean |sigmoid(logit) - 0.5| (0 = unsure, 0.5 = sure),
per photo and overall, for the "einops" and "legacy" orders; the higher one is the likely order.
Use a few photos with a clear subject. Untrained (recipe) weights give no real answer.

Workers run the same comparison on their own when they load trained weights (worker.loading's
`settle_patch_order`, with worker.patch_order's verdict).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from common.domain.variants import VariantSpec
from common.settings import WorkerSettings
from worker.engine import Predictor
from worker.patch_order import PATCH_ORDERS, decode_photos, mask_confidence
from worker.pipeline.types import parse_resolution

# Below this difference in overall confidence the verdict is "inconclusive".
DECISIVE_MARGIN = 0.02


def measure(
    weights: str, backbone: str, photos: list[Path], resolution: tuple[int, int], settings: WorkerSettings
) -> dict[str, list[float]]:
    images = decode_photos(photos, settings)
    scores: dict[str, list[float]] = {}
    for order in PATCH_ORDERS:
        spec = VariantSpec(id=f"patch-order-{order}", weights=weights, backbone=backbone, patch_order=order)
        predictor = Predictor(spec, settings)
        predictor.load()
        scores[order] = [
            mask_confidence(m) for m in (predictor.predict_masks([image], resolution)[0] for image in images)
        ]
        del predictor  # one model in memory at a time (Swin-L is ~0.9 GB in float32)
    return scores


def verdict(scores: dict[str, list[float]]) -> str:
    overall = {order: float(np.mean(values)) for order, values in scores.items()}
    best, other = sorted(overall, key=overall.__getitem__, reverse=True)
    margin = overall[best] - overall[other]
    wins = sum(a > b for a, b in zip(scores[best], scores[other], strict=True))
    if margin < DECISIVE_MARGIN:
        return (
            f"inconclusive: overall confidence differs by only {margin:.4f} (< {DECISIVE_MARGIN}); "
            "try more photos with a clear subject, or the checkpoint is untrained"
        )
    return (
        f"most likely patch order: {best} (overall confidence {overall[best]:.4f} vs {overall[other]:.4f}, "
        f"higher on {wins} of {len(scores[best])} photos)"
    )


def report(photos: list[Path], scores: dict[str, list[float]]) -> str:
    lines = ["| photo | einops | legacy |", "| --- | --- | --- |"]
    for index, photo in enumerate(photos):
        lines.append(f"| {photo.name} | {scores['einops'][index]:.4f} | {scores['legacy'][index]:.4f} |")
    lines.append(f"| **overall** | {np.mean(scores['einops']):.4f} | {np.mean(scores['legacy']):.4f} |")
    return "\n".join(lines) + "\n\n" + verdict(scores)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m worker.patch_order_check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--weights", required=True, help="checkpoint source (as in a variant's `weights`)")
    parser.add_argument("--backbone", default="swin_v1_l")
    parser.add_argument(
        "--resolution", default="1024x1024", help="operating resolution WxH (default 1024x1024)"
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: default)")
    parser.add_argument("photos", nargs="+", type=Path)
    args = parser.parse_args(argv)

    settings = WorkerSettings(
        device=args.device,
        torch_threads=args.threads,
        weights_fallback="none",
        patch_order_check="off",
        warmup_forward=False,
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    scores = measure(args.weights, args.backbone, args.photos, parse_resolution(args.resolution), settings)
    if args.weights.strip() == "recipe":
        print("NOTE: recipe weights are untrained; the numbers only show that the check runs.")
    print(report(args.photos, scores))
    return 0


if __name__ == "__main__":
    sys.exit(main())
