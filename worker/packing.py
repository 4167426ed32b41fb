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

from common.settings import WorkerSettings
from worker.engine import Predictor
from worker.loading import LoadedNetwork, real_network_or_reason, recipe_banner, recipe_network

log = logging.getLogger(__name__)


def load_predictors(
    settings: WorkerSettings, on_ready: Callable[[str, Predictor, float], None] | None = None
) -> dict[str, Predictor]:
    """{variant id: loaded predictor} for `settings.worker_variants`, sharing networks where allowed.

    `on_ready(variant, predictor, seconds)` is called as each variant becomes servable."""
    share = settings.worker_share_networks
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
            log.info(
                "variant %s shares the network already loaded for %s (same checkpoint %s)",
                variant_id,
                predictor.spec.id,
                spec.weights,
            )
        else:
            predictor = _load_one(spec, settings, by_recipe if share else None)
            by_source[source_key] = predictor
            if predictor.untrained:
                by_recipe.setdefault(recipe_key, predictor)
        predictors[variant_id] = predictor
        if on_ready is not None:
            on_ready(variant_id, predictor, time.perf_counter() - started)
    return predictors


def _load_one(spec, settings: WorkerSettings, recipes: dict[tuple[str, str], Predictor] | None) -> Predictor:
    loaded = real_network_or_reason(spec, settings)
    shared = recipes.get((spec.backbone, spec.patch_order)) if recipes is not None else None
    if isinstance(loaded, str) and shared is not None:
        recipe_banner(
            spec,
            loaded,
            f"Shares the recipe network of {shared.spec.id} "
            f"({spec.backbone}, {spec.patch_order} patch order).",
        )
        return shared
    predictor = Predictor(spec, settings)
    predictor.load(loaded if isinstance(loaded, LoadedNetwork) else recipe_network(spec, reason=loaded))
    return predictor
