"""Several variants in one worker process: load each distinct network once.

A worker started with `--variants a,b,c` serves every listed queue from one process (one GPU). Variants
that name the same checkpoint, backbone and patch order (v1 and v2 Portrait do) share one warm network,
and so do variants that end up on untrained recipe weights with the same backbone and patch order (the
local stack offline), unless `worker_share_networks` is false.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from common.settings import Settings
from worker.engine import Predictor
from worker.loading import load_network, log_banner, recipe_network
from worker.weights import WeightsError, parse_source

log = logging.getLogger(__name__)


def load_predictors(settings: Settings,
                    on_ready: Callable[[str, Predictor, float], None] | None = None) -> dict[str, Predictor]:
    """{variant id: loaded predictor} for `settings.worker_variants`, sharing networks where allowed.

    `on_ready(variant, predictor, seconds)` is called as each variant becomes servable."""
    share = settings.worker_share_networks
    strict = settings.model_copy(update={"weights_fallback": "none"})  # the fallback is decided here
    by_source: dict[tuple[str, str, str], Predictor] = {}
    by_recipe: dict[tuple[str, str], Predictor] = {}
    predictors: dict[str, Predictor] = {}
    for variant_id in settings.worker_variants:
        spec = settings.variants.get(variant_id)
        started = time.perf_counter()
        source_key = (spec.weights, spec.backbone, spec.patch_order)
        recipe_key = (spec.backbone, spec.patch_order)
        predictor = by_source.get(source_key) if share else None
        if predictor is not None:
            log.info("variant %s shares the network already loaded for %s (same checkpoint %s)",
                     variant_id, predictor.spec.id, spec.weights)
        else:
            predictor = _load_one(spec, settings, strict, by_recipe if share else None)
            by_source[source_key] = predictor
            if predictor.untrained:
                by_recipe.setdefault(recipe_key, predictor)
        predictors[variant_id] = predictor
        if on_ready is not None:
            on_ready(variant_id, predictor, time.perf_counter() - started)
    return predictors


def _load_one(spec, settings: Settings, strict: Settings,
              recipes: dict[tuple[str, str], Predictor] | None) -> Predictor:
    recipe_key = (spec.backbone, spec.patch_order)
    is_recipe = parse_source(spec.weights).kind == "recipe"
    if is_recipe:
        reason = "the variant's weights are set to 'recipe'"
    else:
        try:
            loaded = load_network(spec, strict)
        except WeightsError as exc:
            if settings.weights_fallback != "recipe":
                raise
            log.error("variant %s: %s", spec.id, exc)
            reason = f"fallback, the real checkpoint failed: {exc}"
        else:
            predictor = Predictor(spec, settings)
            predictor.load(loaded)
            return predictor
    if recipes is not None and recipe_key in recipes:
        shared = recipes[recipe_key]
        log_banner(f"VARIANT {spec.id!r} RUNS UNTRAINED RECIPE WEIGHTS",
                   "Masks are meaningless: this is not a trained model. For demos and tests only.",
                   f"Reason: {reason}",
                   f"Shares the recipe network of {shared.spec.id} ({spec.backbone}, {spec.patch_order} patch order).")
        return shared
    predictor = Predictor(spec, settings)
    predictor.load(recipe_network(spec, reason=reason))
    return predictor
