"""Which patch order a loaded BiRefNet decoder uses: the load-time check's verdict (worker.loading applies
it).

A trained BiRefNet is confident on real photos: most pixels are clearly foreground or clearly background.
Run with the wrong patch channel order it gets scrambled image-patch features and its masks turn hesitant.
Confidence here is mean |sigmoid(logit) - 0.5| (0 = unsure, 0.5 = sure). Workers compare both orders on the
photos in worker/samples/ (or BIREFNET_PATCH_ORDER_CHECK_PHOTOS), at BIREFNET_PATCH_ORDER_CHECK_RESOLUTION.
If the configured order is clearly worse (by BIREFNET_PATCH_ORDER_CHECK_MARGIN overall, and on most
photos), the worker adopts the other one and logs a banner, unless BIREFNET_PATCH_ORDER_CHECK=pin; too
close to call keeps the configured order, and says so. `python -m worker.patch_order_check` runs the same
comparison on any checkpoint.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from common.settings import WorkerSettings
from worker.pipeline.decode import decode_image

PATCH_ORDERS = ("einops", "legacy")
SAMPLES_DIR = Path(__file__).resolve().parent / "samples"


def mask_confidence(mask: np.ndarray) -> float:
    return float(np.abs(mask.astype(np.float64) - 0.5).mean())


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


def decode_photos(photos: list[Path], settings: WorkerSettings) -> list[Image.Image]:
    return [
        decode_image(
            path.read_bytes(),
            max_pixels=settings.max_input_pixels,
            max_side=settings.max_input_side,
            min_side=1,
        )
        for path in photos
    ]


def sample_photos(settings: WorkerSettings) -> list[Path]:
    if settings.patch_order_check_photos:
        return [Path(p).expanduser() for p in settings.patch_order_check_photos]
    return sorted(SAMPLES_DIR.glob("*.jpg"))


def decide(
    scores: dict[str, list[float]], configured: str, *, margin: float, pin: bool
) -> tuple[str, str, str]:
    """(order to use, verdict, message) from per-photo confidences under both orders."""
    other = next(o for o in PATCH_ORDERS if o != configured)
    overall = {order: float(np.mean(values)) for order, values in scores.items()}
    photos = len(scores[configured])
    other_wins = sum(b > a for a, b in zip(scores[configured], scores[other], strict=True))
    figures = (
        f"mask confidence {configured} {overall[configured]:.4f} vs {other} {overall[other]:.4f} "
        f"on {photos} sample photo(s)"
    )
    if overall[other] - overall[configured] >= margin and other_wins * 2 > photos:
        if pin:
            return (
                configured,
                "pinned",
                (
                    f"the configured patch order {configured} looks WRONG ({figures}; {other} "
                    f"higher on {other_wins}); kept because BIREFNET_PATCH_ORDER_CHECK=pin"
                ),
            )
        return (
            other,
            "adopted",
            (
                f"the configured patch order {configured} looks WRONG ({figures}; {other} higher "
                f"on {other_wins}); using {other} instead (BIREFNET_PATCH_ORDER_CHECK=pin keeps "
                f"{configured}; set the variant's patch_order to {other} to silence this)"
            ),
        )
    if overall[configured] - overall[other] >= margin and (photos - other_wins) * 2 > photos:
        return configured, "confirmed", f"the configured patch order {configured} is confirmed ({figures})"
    return (
        configured,
        "inconclusive",
        (f"too close to call ({figures}; margin {margin}); keeping the configured patch order {configured}"),
    )
