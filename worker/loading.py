"""Variant -> ready network: native BiRefNet with its checkpoint, remote code (opt-in), or recipe.

Untrained recipe weights are used only when the variant asks for `recipe`, or when
`weights_fallback="recipe"` and the real checkpoint cannot be loaded. Either way the log shows a
banner and the result says `untrained=True`, so nobody mistakes the output for a real model's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from common.domain.variants import VariantSpec
from common.settings import WorkerSettings
from worker.birefnet import BiRefNet, BiRefNetConfig, recipe_state_dict
from worker.patch_order import (
    PATCH_ORDERS,
    PatchOrderReport,
    decide,
    decode_photos,
    mask_confidence,
    sample_photos,
)
from worker.pipeline.types import ImageLike, parse_resolution
from worker.remote_code import has_remote_code, load_remote_code_network
from worker.weights import WeightsError, fetch, load_into, parse_source, read_state_dict

log = logging.getLogger(__name__)

_BANNER_WIDTH = 92


@dataclass(frozen=True)
class LoadedNetwork:
    """A network mapping (N,3,H,W) ImageNet-normalised images to (N,1,H,W) mask logits."""

    module: nn.Module
    untrained: bool
    description: str  # what was loaded, for logs and results


def build_native(spec: VariantSpec) -> BiRefNet:
    return BiRefNet(BiRefNetConfig(backbone=spec.backbone, patch_order=spec.patch_order))


def load_network(spec: VariantSpec, settings: WorkerSettings) -> LoadedNetwork:
    """Build the variant's network with its weights, on the CPU, in eval mode."""
    loaded = real_network_or_reason(spec, settings)
    return loaded if isinstance(loaded, LoadedNetwork) else recipe_network(spec, reason=loaded)


def real_network_or_reason(spec: VariantSpec, settings: WorkerSettings) -> LoadedNetwork | str:
    """The variant's real network, or why it runs recipe weights instead (raises if no fallback applies)."""
    if parse_source(spec.weights).kind == "recipe":
        return "the variant's weights are set to 'recipe'"
    try:
        return _real_network(spec, settings)
    except WeightsError as exc:
        if settings.weights_fallback != "recipe":
            raise
        log.error("variant %s: %s", spec.id, exc)
        return f"fallback, the real checkpoint failed: {exc}"


def _real_network(spec: VariantSpec, settings: WorkerSettings) -> LoadedNetwork:
    source = parse_source(spec.weights)
    path = fetch(source, settings)
    model = build_native(spec)
    description = f"{source.description} ({spec.backbone}, {spec.patch_order} patch order)"
    try:
        load_into(model, read_state_dict(path), source=source.description)
    except WeightsError as native_error:
        if not (path.is_dir() and has_remote_code(path)):
            raise
        if not settings.trust_remote_code:
            raise WeightsError(
                f"{native_error}. The repo ships its own modelling code; set BIREFNET_TRUST_REMOTE_CODE=true "
                "to run it through transformers (executes Python from the repo)."
            ) from native_error
        log.warning(
            "variant %s: checkpoint does not fit the native model (%s); using the repo's code",
            spec.id,
            native_error,
        )
        network = load_remote_code_network(Path(path)).eval()
        return LoadedNetwork(
            network, untrained=False, description=f"{source.description} (transformers remote code)"
        )
    return LoadedNetwork(model.eval(), untrained=False, description=description)


def recipe_network(spec: VariantSpec, *, reason: str) -> LoadedNetwork:
    model = build_native(spec)
    model.load_state_dict(recipe_state_dict(model), strict=True)
    description = f"UNTRAINED recipe weights ({spec.backbone}, {spec.patch_order} patch order; {reason})"
    recipe_banner(spec, reason)
    return LoadedNetwork(model.eval(), untrained=True, description=description)


def recipe_banner(spec: VariantSpec, reason: str, *more: str) -> None:
    log_banner(
        f"VARIANT {spec.id!r} RUNS UNTRAINED RECIPE WEIGHTS",
        "Masks are meaningless: this is not a trained model. For demos and tests only.",
        f"Reason: {reason}",
        *more,
    )


def log_banner(*lines: str) -> None:
    rule = "!" * _BANNER_WIDTH
    body = "\n".join(f"!!! {line}" for line in lines)
    log.warning("\n%s\n%s\n%s", rule, body, rule)


# --- The decoder's patch order ---

MaskFunction = Callable[[Sequence[ImageLike], tuple[int, int]], list[np.ndarray]]


def settle_patch_order(
    network: nn.Module, spec: VariantSpec, settings: WorkerSettings, *, untrained: bool, masks: MaskFunction
) -> PatchOrderReport:
    """Decide which patch order `network`'s decoder runs and set it: compare both orders' mask confidence on
    the sample photos (`masks` runs the loaded network on its device), and switch to the other order when the
    configured one is clearly worse and the setting allows it. The only code that sets a patch order."""
    configured = spec.patch_order
    decoder: Any = getattr(network, "decoder", None)  # the native decoder (worker.birefnet.decoder) or none
    if settings.patch_order_check == "off":
        report = PatchOrderReport(
            configured, configured, "skipped", "patch-order check off (BIREFNET_PATCH_ORDER_CHECK)"
        )
    elif untrained:
        report = PatchOrderReport(
            configured,
            configured,
            "skipped",
            "not run: untrained recipe weights learned "
            "nothing, so neither order makes them more confident (the answer would be noise)",
        )
    elif decoder is None or getattr(decoder, "patch_order", None) not in PATCH_ORDERS:
        report = PatchOrderReport(
            configured,
            configured,
            "skipped",
            "not run: the network is not the native "
            "BiRefNet (remote code), whose patch order cannot be switched",
        )
    else:
        report = _compare_patch_orders(decoder, configured, settings, masks)
    _log_patch_order(spec.id, report)
    return report


def _compare_patch_orders(
    decoder: Any, configured: str, settings: WorkerSettings, masks: MaskFunction
) -> PatchOrderReport:
    images = decode_photos(sample_photos(settings), settings)
    if not images:
        return PatchOrderReport(configured, configured, "skipped", "not run: no sample photos")
    resolution = parse_resolution(settings.patch_order_check_resolution)
    scores: dict[str, list[float]] = {}
    try:
        for order in PATCH_ORDERS:
            decoder.patch_order = order
            scores[order] = [mask_confidence(m) for m in masks(images, resolution)]
    finally:
        decoder.patch_order = configured
    in_use, verdict, message = decide(
        scores, configured, margin=settings.patch_order_check_margin, pin=settings.patch_order_check == "pin"
    )
    decoder.patch_order = in_use
    overall = {order: round(float(np.mean(values)), 5) for order, values in scores.items()}
    return PatchOrderReport(configured, in_use, verdict, message, overall, len(images))


def _log_patch_order(variant: str, report: PatchOrderReport) -> None:
    """Loud for a wrong-looking order (adopted or pinned), a warning when too close, info otherwise."""
    text = f"variant {variant}: patch-order check: {report.message}"
    if report.verdict in ("adopted", "pinned"):
        log_banner(f"VARIANT {variant!r}: PATCH ORDER {report.verdict.upper()}", report.message)
    elif report.verdict == "inconclusive":
        log.warning("%s", text)
    else:
        log.info("%s", text)
