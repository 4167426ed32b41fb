"""Which decoder patch order does a checkpoint use? Compare mask confidence under both.

    python -m worker.patch_order_check --weights hf://ZhengPeng7/BiRefNet@<rev>/model.safetensors \\
        --backbone swin_v1_l photo1.jpg photo2.jpg ...

A trained BiRefNet is confident on real photos: most pixels are clearly foreground or clearly
background. Run with the wrong patch channel order it gets scrambled image-patch features and
its masks turn hesitant. Confidence here is mean |sigmoid(logit) - 0.5| (0 = unsure, 0.5 = sure),
per photo and overall, for the "einops" and "legacy" orders; the higher one is the likely order.
Use a few photos with a clear subject. Untrained (recipe) weights give no real answer.

Workers run the same comparison on their own when they load trained weights (`self_check`, called by
`Predictor.load`): on the photos in worker/samples/ (or BIREFNET_PATCH_ORDER_CHECK_PHOTOS), at
BIREFNET_PATCH_ORDER_CHECK_RESOLUTION. If the configured order is clearly worse (by
BIREFNET_PATCH_ORDER_CHECK_MARGIN overall, and on most photos), the worker adopts the other one and logs
a banner, unless BIREFNET_PATCH_ORDER_CHECK=pin; too close to call keeps the configured order, and says so.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from common.domain.variants import VariantSpec
from common.settings import WorkerSettings
from worker.imaging import decode_image

if TYPE_CHECKING:
    from worker.engine import Predictor

log = logging.getLogger(__name__)

PATCH_ORDERS = ("einops", "legacy")
# Below this difference in overall confidence the verdict is "inconclusive".
DECISIVE_MARGIN = 0.02
SAMPLES_DIR = Path(__file__).resolve().parent / "samples"


def mask_confidence(mask: np.ndarray) -> float:
    return float(np.abs(mask.astype(np.float64) - 0.5).mean())


def _decode(photos: list[Path], settings: WorkerSettings) -> list:
    return [decode_image(path.read_bytes(), max_pixels=settings.max_input_pixels, max_side=settings.max_input_side,
                         min_side=1) for path in photos]


def measure(weights: str, backbone: str, photos: list[Path], resolution: tuple[int, int],
            settings: WorkerSettings) -> dict[str, list[float]]:
    from worker.engine import Predictor

    images = _decode(photos, settings)
    scores: dict[str, list[float]] = {}
    for order in PATCH_ORDERS:
        spec = VariantSpec(id=f"patch-order-{order}", weights=weights, backbone=backbone, patch_order=order)
        predictor = Predictor(spec, settings)
        predictor.load()
        scores[order] = [mask_confidence(m) for m in
                         (predictor.predict_masks([image], resolution)[0] for image in images)]
        del predictor  # one model in memory at a time (Swin-L is ~0.9 GB in float32)
    return scores


def verdict(scores: dict[str, list[float]]) -> str:
    overall = {order: float(np.mean(values)) for order, values in scores.items()}
    best, other = sorted(overall, key=overall.__getitem__, reverse=True)
    margin = overall[best] - overall[other]
    wins = sum(a > b for a, b in zip(scores[best], scores[other], strict=True))
    if margin < DECISIVE_MARGIN:
        return (f"inconclusive: overall confidence differs by only {margin:.4f} (< {DECISIVE_MARGIN}); "
                "try more photos with a clear subject, or the checkpoint is untrained")
    return (f"most likely patch order: {best} (overall confidence {overall[best]:.4f} vs {overall[other]:.4f}, "
            f"higher on {wins} of {len(scores[best])} photos)")


def report(photos: list[Path], scores: dict[str, list[float]]) -> str:
    lines = ["| photo | einops | legacy |", "| --- | --- | --- |"]
    for index, photo in enumerate(photos):
        lines.append(f"| {photo.name} | {scores['einops'][index]:.4f} | {scores['legacy'][index]:.4f} |")
    lines.append(f"| **overall** | {np.mean(scores['einops']):.4f} | {np.mean(scores['legacy']):.4f} |")
    return "\n".join(lines) + "\n\n" + verdict(scores)


# --- The worker's own check at load time ---


@dataclass(frozen=True)
class PatchOrderReport:
    """What the load-time check found for one loaded network (shown in logs, metrics, heartbeats)."""

    configured: str
    in_use: str
    verdict: str  # confirmed | adopted | pinned | inconclusive | skipped
    message: str
    confidence: dict[str, float] = field(default_factory=dict)  # overall, per order (empty when skipped)
    photos: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def sample_photos(settings: WorkerSettings) -> list[Path]:
    if settings.patch_order_check_photos:
        return [Path(p).expanduser() for p in settings.patch_order_check_photos]
    return sorted(SAMPLES_DIR.glob("*.jpg"))


def decide(scores: dict[str, list[float]], configured: str, *, margin: float, pin: bool) -> tuple[str, str, str]:
    """(order to use, verdict, message) from per-photo confidences under both orders."""
    other = next(o for o in PATCH_ORDERS if o != configured)
    overall = {order: float(np.mean(values)) for order, values in scores.items()}
    photos = len(scores[configured])
    other_wins = sum(b > a for a, b in zip(scores[configured], scores[other], strict=True))
    figures = (f"mask confidence {configured} {overall[configured]:.4f} vs {other} {overall[other]:.4f} "
               f"on {photos} sample photo(s)")
    if overall[other] - overall[configured] >= margin and other_wins * 2 > photos:
        if pin:
            return configured, "pinned", (f"the configured patch order {configured} looks WRONG ({figures}; {other} "
                                          f"higher on {other_wins}); kept because BIREFNET_PATCH_ORDER_CHECK=pin")
        return other, "adopted", (f"the configured patch order {configured} looks WRONG ({figures}; {other} higher "
                                  f"on {other_wins}); using {other} instead (BIREFNET_PATCH_ORDER_CHECK=pin keeps "
                                  f"{configured}; set the variant's patch_order to {other} to silence this)")
    if overall[configured] - overall[other] >= margin and (photos - other_wins) * 2 > photos:
        return configured, "confirmed", f"the configured patch order {configured} is confirmed ({figures})"
    return configured, "inconclusive", (f"too close to call ({figures}; margin {margin}); keeping the configured "
                                        f"patch order {configured}")


def self_check(predictor: Predictor) -> PatchOrderReport:
    """Compare both patch orders on the sample photos with the predictor's own (eager) network; switch the
    network to the better order when the configured one is clearly worse and the setting allows it."""
    from worker.engine import parse_resolution

    settings, spec = predictor.settings, predictor.spec
    configured = spec.patch_order
    decoder = getattr(predictor.network, "decoder", None)
    if settings.patch_order_check == "off":
        return PatchOrderReport(configured, configured, "skipped", "patch-order check off (BIREFNET_PATCH_ORDER_CHECK)")
    if predictor.untrained:
        return PatchOrderReport(configured, configured, "skipped", "not run: untrained recipe weights learned "
                                "nothing, so neither order makes them more confident (the answer would be noise)")
    if decoder is None or getattr(decoder, "patch_order", None) not in PATCH_ORDERS:
        return PatchOrderReport(configured, configured, "skipped", "not run: the network is not the native "
                                "BiRefNet (remote code), whose patch order cannot be switched")
    images = _decode(sample_photos(settings), settings)
    if not images:
        return PatchOrderReport(configured, configured, "skipped", "not run: no sample photos")
    resolution = parse_resolution(settings.patch_order_check_resolution)
    scores: dict[str, list[float]] = {}
    try:
        for order in PATCH_ORDERS:
            decoder.patch_order = order
            scores[order] = [mask_confidence(m) for m in predictor.predict_masks(images, resolution)]
    finally:
        decoder.patch_order = configured
    in_use, verdict, message = decide(scores, configured, margin=settings.patch_order_check_margin,
                                      pin=settings.patch_order_check == "pin")
    decoder.patch_order = in_use
    overall = {order: round(float(np.mean(values)), 5) for order, values in scores.items()}
    return PatchOrderReport(configured, in_use, verdict, message, overall, len(images))


def log_patch_order(variant: str, report: PatchOrderReport) -> None:
    """Loud for a wrong-looking order (adopted or pinned), a warning when too close, info otherwise."""
    from worker.loading import log_banner

    text = f"variant {variant}: patch-order check: {report.message}"
    if report.verdict in ("adopted", "pinned"):
        log_banner(f"VARIANT {variant!r}: PATCH ORDER {report.verdict.upper()}", report.message)
    elif report.verdict == "inconclusive":
        log.warning("%s", text)
    else:
        log.info("%s", text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.patch_order_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True, help="checkpoint source (as in a variant's `weights`)")
    parser.add_argument("--backbone", default="swin_v1_l")
    parser.add_argument("--resolution", default="1024x1024", help="operating resolution WxH (default 1024x1024)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: default)")
    parser.add_argument("photos", nargs="+", type=Path)
    args = parser.parse_args(argv)

    from worker.engine import parse_resolution

    settings = WorkerSettings(device=args.device, torch_threads=args.threads, weights_fallback="none", patch_order_check="off",
                        warmup_forward=False)
    if args.threads:
        torch.set_num_threads(args.threads)
    scores = measure(args.weights, args.backbone, args.photos, parse_resolution(args.resolution), settings)
    if args.weights.strip() == "recipe":
        print("NOTE: recipe weights are untrained; the numbers only show that the check runs.")
    print(report(args.photos, scores))
    return 0


if __name__ == "__main__":
    sys.exit(main())
