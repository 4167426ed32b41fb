"""`ops status` data: per-variant queues, workers, throughput and latency, webhook failures, dead letters."""

from __future__ import annotations

import json
import math
import time
from collections import Counter, defaultdict
from typing import cast

import redis

from common.settings import OpsOptions, VariantSettings
from common.state import keys, ops_state
from common.state.unserved import model_label


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None without values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def _floats(entries: list[dict], field: str) -> list[float]:
    return [float(e[field]) for e in entries if e.get(field)]


def completion_stats(entries: list[dict], window: float) -> dict:
    """Throughput and latency of one variant's completions in the window (latencies of `done` jobs only:
    rejected inputs fail in milliseconds and would flatter the figures)."""
    outcomes = Counter(e.get("outcome", "") for e in entries)
    done = [e for e in entries if e.get("outcome") == "done"]
    stats: dict[str, object] = {
        "completed": len(entries),
        "done": outcomes["done"],
        "failed": outcomes["failed"],
        "cancelled": outcomes["cancelled"],
        "jobs_per_minute": round(len(entries) / (window / 60), 3) if window else None,
        "errors": dict(Counter(e["error_type"] for e in entries if e.get("error_type"))),
    }
    for name, field in (("latency", "latency"), ("run", "run"), ("queue_wait", "queue_wait")):
        values = _floats(done, field)
        stats[f"{name}_p50"] = percentile(values, 50)
        stats[f"{name}_p95"] = percentile(values, 95)
    return stats


def workers(r: redis.Redis, now: float) -> list[dict]:
    out = [
        {
            "name": beat.get("name"),
            "node": ops_state.celery_node(beat.get("name", "")),
            "variants": beat.get("variants", []),
            "untrained": beat.get("untrained", []),
            "device": beat.get("device", ""),
            "seen_seconds_ago": round(now - beat.get("seen_at", now), 1),
            "patch_order": beat.get("patch_order") or {},
            "up_seconds": round(now - beat["started_at"], 1) if beat.get("started_at") else None,
        }
        for beat in ops_state.live_workers(r)
    ]
    return sorted(out, key=lambda w: w["name"] or "")


def _newest_scored(r: redis.Redis, key: str, limit: int) -> list[tuple[str, float]]:
    """The `limit` highest-scored members of a sorted set, with their scores. redis-py types replies as
    bytes or str whatever the client; ops' client decodes them (str)."""
    return cast(list[tuple[str, float]], r.zrevrange(key, 0, limit - 1, withscores=True))


def webhook_failures(r: redis.Redis, limit: int = 5) -> dict:
    """`failed`: requests whose every attempt failed (retries exhausted); `retrying`: requests whose last
    attempt failed and that have a retry booked."""
    failed_total = r.zcard(keys.WEBHOOK_FAILED)
    recent = []
    for request_id, failed_at in _newest_scored(r, keys.WEBHOOK_FAILED, limit):
        count = int(r.hget(keys.job(request_id), keys.WEBHOOK_ATTEMPT_COUNT_FIELD) or 0)
        last = r.hget(keys.job(request_id), keys.webhook_attempt_field(count - 1)) if count else None
        attempt = json.loads(last) if last else {}
        recent.append(
            {
                "request_id": request_id,
                "failed_at": failed_at,
                "webhook_url": _spec_field(r, request_id, "webhook_url"),
                "attempts": count,
                "last_error": attempt.get("error"),
            }
        )
    # A booked attempt after a failed one: a retry (a failure sets webhook_next; a 2xx ends the bookings).
    booked = {member.rpartition("|")[0] for member in cast(list[str], r.zrange(keys.WEBHOOK_DUE, 0, 9999))}
    pipe = r.pipeline()
    for request_id in booked:
        pipe.hget(keys.job(request_id), "webhook_next")
    retrying = sum(1 for next_attempt in pipe.execute() if int(next_attempt or 0) > 0)
    return {"failed": failed_total, "retrying": retrying, "recent_failures": recent}


def _spec_field(r: redis.Redis, request_id: str, field: str) -> object:
    raw = r.hget(keys.job(request_id), "spec")
    return json.loads(raw).get(field) if raw else None


def deadletters(r: redis.Redis, limit: int = 20) -> dict:
    entries = []
    for request_id, dead_at in _newest_scored(r, keys.DEADLETTER, limit):
        raw = r.hgetall(keys.job(request_id))
        spec = json.loads(raw["spec"]) if raw.get("spec") else {}
        entries.append(
            {
                "request_id": request_id,
                "dead_at": dead_at,
                "variant": spec.get("variant"),
                "image_url": spec.get("image_url"),
                "status": raw.get("status"),
                "attempts": int(raw.get("attempts") or 0),
                "last_error": raw.get("last_error") or None,
                "error": raw.get("error") or None,
                "created_at": float(raw["created_at"]) if raw.get("created_at") else None,
            }
        )
    return {"count": r.zcard(keys.DEADLETTER), "entries": entries}


def unserved(snapshot: dict[str, dict], settings: VariantSettings) -> list[dict]:
    """Variants with jobs waiting and no live worker: nobody will take those jobs until one starts."""
    out = []
    for variant, figures in snapshot.items():
        if figures["workers"] or not (figures["waiting_jobs"] or figures["queued_messages"]):
            continue
        try:
            label = model_label(settings.variants.get(variant))
        except KeyError:
            label = variant
        out.append(
            {
                "variant": variant,
                "model": label,
                "waiting_jobs": figures["waiting_jobs"],
                "queued_messages": figures["queued_messages"],
                "oldest_waiting_seconds": figures["oldest_waiting_seconds"],
            }
        )
    return out


def gather_status(
    r: redis.Redis,
    settings: OpsOptions,
    *,
    window: float | None = None,
    show_all: bool = False,
    now: float | None = None,
) -> dict:
    now = time.time() if now is None else now
    window = float(window or settings.ops_window_seconds)
    queues = {v.id: v.queue for v in settings.variants}
    completions = defaultdict(list)
    for entry in ops_state.read_completions(r, now - window):
        completions[entry.get("variant", "")].append(entry)
    for variant in completions:  # a variant known to the workers but not to this configuration
        queues.setdefault(variant, f"birefnet.{variant}")
    snapshot = ops_state.variant_snapshot(r, queues, now=now)
    variants = {}
    for variant, figures in snapshot.items():
        figures.update(completion_stats(completions.get(variant, []), window))
        active = (
            figures["queued_messages"]
            or figures["waiting_jobs"]
            or figures["in_progress"]
            or figures["workers"]
            or figures["paused"]
            or figures["completed"]
        )
        if show_all or active:
            variants[variant] = figures
    live = workers(r, now)
    return {
        "unserved_variants": unserved(snapshot, settings),
        "at": now,
        "window_seconds": window,
        "variants": variants,
        "workers": live,
        "untrained_variants": sorted({v for w in live for v in w["untrained"]}),
        "webhooks": webhook_failures(r),
        "deadletters": deadletters(r, limit=5),
    }
