"""Background duties of the gateway: expire queued requests past their start deadline, delete old files,
report unserved models; the schedules are atomically popped sorted sets, so replicas share the work."""

from __future__ import annotations

import asyncio
import logging
import time

from fastapi.concurrency import run_in_threadpool

from common.adapters.storage import request_output_prefix
from common.domain.errors import RequestTimeout
from common.domain.status import Status
from common.state import keys
from common.state.results import fail_job
from common.state.unserved import note_unserved_jobs
from gateway.context import Gateway, ShardClients

log = logging.getLogger(__name__)


def expire_deadlines(gw: Gateway, shard: ShardClients) -> int:
    """Complete requests still queued past their X-Fal-Request-Timeout with fal's 504 request_timeout.

    The worker checks the same deadline when it claims a job; this covers jobs no worker reaches in time.
    A worker claiming at the same moment wins or loses atomically (the completion needs no live lease).
    """
    expired = 0
    for request_id in shard.store.pop_due(keys.DEADLINES):
        record = shard.store.get(request_id)
        if record is None or record.status != Status.IN_QUEUE:
            continue
        if fail_job(
            exc=RequestTimeout(), settings=gw.settings, store=shard.store, objects=None, spec=record.spec
        ):
            expired += 1
    return expired


def delete_expired_files(gw: Gateway, shard: ShardClients) -> int:
    """Delete output files (per request) and uploads whose retention has ended."""
    deleted = 0
    bucket = gw.settings.output_bucket
    for member in shard.store.pop_due(keys.OUTPUTS):
        kind, _, name = member.partition(":")
        if kind == "obj":
            gw.objects.delete(bucket, name)
            deleted += 1
            continue
        record = shard.store.get(name)
        if record is not None and not record.status.is_terminal:
            # Retention counts from completion: look again later.
            shard.redis.zadd(
                keys.OUTPUTS, {member: time.time() + float(record.spec.extra.get("output_ttl", 3600))}
            )
            continue
        if record is not None and record.completed_at:
            due = record.completed_at + float(record.spec.extra.get("output_ttl", 0))
            if due > time.time():
                shard.redis.zadd(keys.OUTPUTS, {member: due})
                continue
        deleted += gw.objects.delete_prefix(bucket, request_output_prefix(gw.settings, name))
    return deleted


async def sweep_forever(gw: Gateway) -> None:
    while True:
        await asyncio.sleep(gw.settings.gateway_sweep_interval)
        for shard in gw.shards:  # each shard's schedules hold its own requests (uploads: shard 0)
            try:
                await run_in_threadpool(expire_deadlines, gw, shard)
                await run_in_threadpool(delete_expired_files, gw, shard)
                variants = [v for v in gw.settings.variants if gw.shard_map.for_variant(v.id) == shard.shard]
                await run_in_threadpool(note_unserved_jobs, shard.store, variants, time.time())
            except Exception:  # keep sweeping through Redis or S3 hiccups; the schedules persist
                log.warning("gateway sweep of %s failed; retrying", shard.shard.name, exc_info=True)
