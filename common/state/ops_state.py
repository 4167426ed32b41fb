"""Operational state in Redis that workers write and ops, metrics, producer and gateway read: pause flags,
the worker registry (so heartbeat keys are found without SCANning), running sets, and the completions
stream (its ids carry Redis's clock, so a time window is an XRANGE)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import cast

import redis
from redis.typing import EncodableT, FieldT

from common.adapters import broker
from common.adapters.broker import as_text as _text
from common.state import keys

HEARTBEAT_TTL = 30


# --- pause flags ---
def set_paused(r: redis.Redis, variant: str, reason: str = "") -> None:
    r.hset(keys.PAUSED, variant, json.dumps({"at": time.time(), "reason": reason}))


def clear_paused(r: redis.Redis, variant: str) -> bool:
    return bool(r.hdel(keys.PAUSED, variant))


def paused_variants(r: redis.Redis) -> dict[str, dict]:
    """{variant: {"at": unix time, "reason": str}} for every paused variant."""
    return {_text(k): json.loads(v) for k, v in r.hgetall(keys.PAUSED).items()}


# --- worker heartbeats ---
def publish_heartbeat(r: redis.Redis, name: str, info: dict) -> None:
    now = time.time()
    pipe = r.pipeline()
    pipe.set(keys.heartbeat(name), json.dumps({**info, "seen_at": now}), ex=HEARTBEAT_TTL)
    pipe.zadd(keys.WORKERS, {name: now})
    pipe.zremrangebyscore(keys.WORKERS, "-inf", now - 86400)  # forget workers gone for a day
    pipe.execute()


def live_workers(r: redis.Redis) -> list[dict]:
    """Heartbeats of the workers seen within the heartbeat TTL."""
    names = [_text(n) for n in r.zrangebyscore(keys.WORKERS, time.time() - HEARTBEAT_TTL, "+inf")]
    if not names:
        return []
    beats = r.mget([keys.heartbeat(n) for n in names])
    return [json.loads(b) for b in beats if b]


def celery_node(worker_name: str) -> str:
    """The Celery node name of a worker (`variants@host`) from its heartbeat name (`variants@host:pid`)."""
    return worker_name.rsplit(":", 1)[0]


# --- running jobs ---


# A claim adds the job to its variant's running set, scored by when its lease lapses (common.state.jobs);
# the completion, or the run giving the job back (requeue), takes it out.
_PRUNE_EVERY = 60.0  # seconds between sweeps of a running set for entries left by killed workers
_pruned: dict[str, float] = {}


def prune_running(r: redis.Redis, variant: str) -> None:
    """Sweep a running set of entries whose lease lapsed a day ago (the orphan sweep sends such jobs again
    long before): once a minute per process (no command otherwise), not with every job."""
    now = time.time()
    if now - _pruned.get(variant, 0.0) > _PRUNE_EVERY:
        _pruned[variant] = now
        r.zremrangebyscore(keys.running(variant), "-inf", now - 86400)


def running_jobs(r: redis.Redis, variants: Iterable[str]) -> dict[str, list[str]]:
    """Jobs a worker is running, by variant: those in the running set whose lease (their score) has not
    lapsed (a killed worker's entry stays behind until the orphan sweep sends its job again)."""
    variants = list(variants)
    now = time.time()
    pipe = r.pipeline()
    for variant in variants:
        pipe.zrangebyscore(keys.running(variant), f"({now!r}", "+inf")
    members = pipe.execute()
    return {v: sorted(_text(rid) for rid in ids) for v, ids in zip(variants, members, strict=True)}


# --- completions stream ---
def record_completion(r: redis.Redis, entry: dict[str, object], *, keep: int) -> None:
    fields: dict[FieldT, EncodableT] = {k: "" if v is None else str(v) for k, v in entry.items()}
    r.xadd(keys.COMPLETIONS, fields, maxlen=keep, approximate=True)


def read_completions(r: redis.Redis, since: float, limit: int | None = None) -> list[dict]:
    """Completion entries newer than `since` (unix time), oldest first, with `at` (unix time) added."""
    # redis-py types a range reply as possibly None; XRANGE always returns a list.
    entries = cast(
        list[tuple[bytes | str, dict[bytes | str, bytes | str]]],
        r.xrange(keys.COMPLETIONS, min=f"{int(since * 1000)}-0", max="+", count=limit),
    )
    out = []
    for entry_id, fields in entries:
        item: dict[str, str | float] = {_text(k): _text(v) for k, v in fields.items()}
        item["at"] = int(_text(entry_id).split("-")[0]) / 1000
        out.append(item)
    return out


# --- one snapshot per variant, shared by `ops status` and the Prometheus queue collector ---


def variant_snapshot(r: redis.Redis, queues: dict[str, str], now: float | None = None) -> dict[str, dict]:
    """{variant: queue figures} for the variants in `queues` ({variant: celery queue name}).

    `queued_messages` counts broker messages (what KEDA scales on), `waiting_jobs` the IN_QUEUE job
    records; `in_progress` the jobs workers are running (see running_jobs). Messages a worker has taken
    and not started (prefetched) are in neither: they left Redis with the pop.
    """
    now = time.time() if now is None else now
    variants = list(queues)
    depths = broker.depths(r, queues.values())
    pipe = r.pipeline()
    for variant in variants:
        key = keys.pending(variant)
        pipe.zcard(key)
        pipe.zrangebyscore(key, "-inf", f"({keys.LOW_PRIORITY_OFFSET}", start=0, num=1)
        pipe.zrangebyscore(key, keys.LOW_PRIORITY_OFFSET, "+inf", start=0, num=1)
    raw = pipe.execute()
    heads = [_text(rid) for i in range(len(variants)) for rid in raw[3 * i + 1] + raw[3 * i + 2]]
    pipe = r.pipeline()
    for rid in heads:
        pipe.hget(keys.job(rid), "created_at")
    created = dict(zip(heads, pipe.execute(), strict=True))
    running = running_jobs(r, variants)
    paused = paused_variants(r)
    workers = live_workers(r)

    out: dict[str, dict] = {}
    for i, variant in enumerate(variants):
        oldest = [
            float(created[_text(rid)]) for rid in raw[3 * i + 1] + raw[3 * i + 2] if created[_text(rid)]
        ]
        serving = [w for w in workers if variant in w.get("variants", [])]
        out[variant] = {
            "queue": queues[variant],
            "queued_messages": depths[queues[variant]],
            "waiting_jobs": raw[3 * i],
            "oldest_waiting_seconds": round(now - min(oldest), 3) if oldest else None,
            "in_progress": len(running[variant]),
            "in_progress_ids": running[variant],
            "paused": variant in paused,
            "paused_since": paused[variant]["at"] if variant in paused else None,
            "workers": sorted(w["name"] for w in serving),
            "untrained_workers": sorted(w["name"] for w in serving if variant in w.get("untrained", [])),
        }
    return out
