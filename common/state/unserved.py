"""Queued jobs for a model that no live worker serves: say so, once, in their status logs while they
wait (the gateway's sweeper calls `note_unserved_jobs`); without a word the caller only sees IN_QUEUE."""

from __future__ import annotations

import json
from collections.abc import Iterable

import redis

from common.domain.variants import VariantSpec
from common.state import keys, ops_state
from common.state.jobs import JobStore, utc_timestamp

NOTED_FIELD = "unserved_noted"
# Per variant and sweep: more waiting jobs are noted on later sweeps.
BATCH = 200

# Only a job still waiting, and only once; the job record must exist (no orphan hash without a TTL).
_NOTE = """
if redis.call('HGET', KEYS[1], 'status') ~= 'IN_QUEUE' then return 0 end
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
local first = tonumber(redis.call('HGET', KEYS[1], 'log_count')) or 0  -- queued: no lease holder writes
redis.call('HSET', KEYS[1], 'log:' .. first, ARGV[3], 'log_count', first + 1)
return 1
"""


def model_label(spec: VariantSpec) -> str:
    """How callers name the variant: its fal model name(s), else its id."""
    names = sorted(set(spec.fal_names.values()))
    return " / ".join(names) if names else spec.id


def unserved_message(spec: VariantSpec) -> str:
    endpoints = "/".join(sorted(spec.fal_names))
    model = f"{endpoints} model, " if endpoints else ""
    return (
        f"no worker serves {model_label(spec)} right now; waiting ({model}variant {spec.id}, queue "
        f"{spec.queue}; "
        f"a worker started with `python -m worker --variants {spec.id}` takes it)"
    )


def served_variants(r: redis.Redis) -> set[str]:
    """Variants that at least one live worker (heartbeat within its TTL) has loaded."""
    return {v for beat in ops_state.live_workers(r) for v in beat.get("variants", [])}


def note_unserved_jobs(store: JobStore, registry: Iterable[VariantSpec], now: float) -> int:
    """Log the 'no worker serves ...' line on every waiting job of an unserved variant (once per job)."""
    r = store.redis
    variants = list(registry)
    # One command while no queue holds a job (an empty sorted set does not exist): the usual case of a
    # served fleet, and of an idle one.
    if not variants or not r.exists(*[keys.pending(spec.id) for spec in variants]):
        return 0
    served = served_variants(r)
    unserved = [spec for spec in variants if spec.id not in served]
    if not unserved or not r.exists(*[keys.pending(spec.id) for spec in unserved]):
        return 0  # jobs wait only for served variants
    # Two commands per unserved variant and sweep, however many jobs wait: the jobs already noted are
    # kept in a set (trimmed to those still waiting), and only the others are looked at.
    pipe = r.pipeline(transaction=False)  # each pair reads what its own first command wrote: no MULTI needed
    for spec in unserved:
        pending, seen = keys.pending(spec.id), keys.unserved_noted(spec.id)
        pipe.zinterstore(seen, {seen: 1, pending: 0})
        pipe.zdiff([pending, seen])
    replies = pipe.execute()
    script = r.register_script(_NOTE)
    noted = 0
    for spec, ids in zip(unserved, replies[1::2], strict=True):
        if not ids:
            continue
        entry = json.dumps(
            {
                "message": unserved_message(spec),
                "level": "WARN",
                "source": "USER",
                "timestamp": utc_timestamp(),
            }
        )
        looked_at = [raw.decode() if isinstance(raw, bytes) else raw for raw in ids[:BATCH]]
        for request_id in looked_at:
            noted += int(
                script(
                    keys=[keys.job(request_id)],
                    args=[NOTED_FIELD, str(now), entry],
                )
            )
        r.zadd(keys.unserved_noted(spec.id), dict.fromkeys(looked_at, now))
    return noted
