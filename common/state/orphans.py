"""Sending again the jobs whose broker message is gone: the job records, not kombu, redeliver.

The job queues run without kombu's ack emulation: a message leaves Redis when a worker pops it, so a worker
killed while holding one (running it, or prefetched behind the job it runs) takes the message with it. A
warm shutdown puts its unstarted messages back; a SIGKILL, an OOM kill or a lost host does not. Workers
therefore look, one at a time per variant (a lock whose TTL sets the cadence), for

- IN_PROGRESS jobs in the variant's running set whose lease lapsed (their worker died, or lost Redis for a
  whole lease) and that have no message waiting: sent again, their claim finds the lapsed lease and claims
  again (the attempt counts, so `max_attempts` dead-letters a job that kills its workers); a job sent again
  is marked so (`RESENT_FIELD`) and left alone for a lease while its copy waits to be claimed;
- IN_QUEUE jobs older than `queued_age` with no message waiting (taken by a worker that died before
  claiming them, or held in a dead worker's memory for a countdown retry).

A duplicate is harmless: a job is claimed once, and a copy that finds the lease alive is dropped.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import cast

from celery import Celery

from common.adapters import broker
from common.adapters.queue import send_job
from common.domain.status import Status
from common.state import keys
from common.state.jobs import JobStore

log = logging.getLogger(__name__)

SCAN_LIMIT = 20_000  # beyond this many messages the check is skipped (a long queue is not an orphan's)
QUEUED_SCAN = 200  # IN_QUEUE jobs looked at per sweep, from the head of the queue (where a lost one ends up)
RESENT_FIELD = "orphan_resent_at"  # record field: when the sweep last found the job abandoned


@dataclass(frozen=True)
class SweepTiming:
    """Cadence and thresholds, all from the lease: a dead worker's job is found within `interval` of its
    lease expiring (at most `lease` after the worker's last renewal)."""

    lease: float  # job_lease_seconds
    interval: float  # seconds between two sweeps of a variant
    queued_age: float  # an IN_QUEUE job younger than this is left alone (its message may be in transit)

    @classmethod
    def from_lease(cls, lease_seconds: float) -> SweepTiming:
        return cls(lease=lease_seconds, interval=max(1.0, lease_seconds / 6), queued_age=2.0 * lease_seconds)


def _ids_with_messages(store: JobStore, queue: str) -> set[str] | None:
    r = store.redis
    lists = broker.queue_lists(queue)
    pipe = r.pipeline(transaction=False)
    for key in lists:
        pipe.llen(key)
    if sum(pipe.execute()) > SCAN_LIMIT:
        return None
    pipe = r.pipeline(transaction=False)
    for key in lists:
        pipe.lrange(key, 0, -1)
    raws = [raw for entries in pipe.execute() for raw in entries]
    return {rid for message in map(broker.decode, raws) if message and (rid := message.job_request_id)}


def _abandoned(store: JobStore, members: list[str], cutoff: float) -> list[str]:
    """Of running-set members whose lease lapsed: those whose record is still IN_PROGRESS, unless the sweep
    sent the job again after `cutoff` and no run has claimed it since (its copy is on its way)."""
    pipe = store.redis.pipeline(transaction=False)
    for rid in members:
        pipe.hmget(keys.job(rid), "status", "started_at", RESENT_FIELD)
    return [
        rid
        for rid, (status, started, resent) in zip(members, pipe.execute(), strict=True)
        if status == Status.IN_PROGRESS
        and not (resent and float(resent) > cutoff and float(resent) >= float(started or 0))
    ]


def _lease_alive(store: JobStore, variant: str, request_id: str, now: float) -> bool:
    lapses = store.redis.zscore(keys.running(variant), request_id)
    return lapses is not None and lapses > now


def _stale_queued(store: JobStore, unlisted: list[str], cutoff: float) -> list[str]:
    """Of waiting jobs with no message in the queue (most are in a worker's hands, about to be claimed):
    those still IN_QUEUE and created before `cutoff`."""
    pipe = store.redis.pipeline(transaction=False)
    for rid in unlisted:
        pipe.hmget(keys.job(rid), "status", "created_at")
    return [
        rid
        for rid, (status, created) in zip(unlisted, pipe.execute(), strict=True)
        if status == Status.IN_QUEUE and created and float(created) < cutoff
    ]


class OrphanSweep:
    """A worker's sweep for the jobs of its variants whose broker message is gone (one per worker process,
    called every `timing.interval`)."""

    def __init__(self, store: JobStore, celery: Celery, timing: SweepTiming):
        self.store, self.celery, self.timing = store, celery, timing
        self._queued_tried: dict[str, float] = {}  # variant -> when this sweep last asked for its scan lock

    def resend(self, variant: str, queue: str) -> list[str]:
        """Send again the IN_PROGRESS jobs of `variant` whose worker died and the old IN_QUEUE ones, when
        they have no message waiting; at most once per `timing.interval` for all workers together."""
        return _resend(self.store, self.celery, variant, queue, self.timing, self._queued_tried)


def _resend(
    store: JobStore,
    celery: Celery,
    variant: str,
    queue: str,
    timing: SweepTiming,
    queued_tried: dict[str, float],
) -> list[str]:
    if not store.redis.set(keys.orphan_scan(variant), "1", nx=True, px=int(timing.interval * 1000)):
        return []  # another worker just looked
    now = time.time()
    suspects = cast(list[str], store.redis.zrangebyscore(keys.running(variant), "-inf", now))  # lapsed leases
    abandoned = _abandoned(store, suspects, now - timing.lease) if suspects else []
    waiting: list[str] = []
    # Reading the queue lists costs Redis a pass over every waiting message: the waiting jobs are looked
    # at once per queued_age / 2 only (each sweep asks for that lock no more often), and for the running
    # ones only when one's lease is gone.
    if now - queued_tried.get(variant, 0.0) >= timing.queued_age / 2:
        queued_tried[variant] = now
        if store.redis.set(keys.orphan_queued_scan(variant), "1", nx=True, px=int(timing.queued_age * 500)):
            waiting = cast(list[str], store.redis.zrange(keys.pending(variant), 0, QUEUED_SCAN - 1))
    if not abandoned and not waiting:
        return []  # the usual answer
    present = _ids_with_messages(store, queue)
    if present is None:
        return []
    found, abandoned = abandoned, [rid for rid in abandoned if rid not in present]
    unlisted = [rid for rid in waiting if rid not in present]
    candidates = abandoned + (_stale_queued(store, unlisted, now - timing.queued_age) if unlisted else [])
    resent = []
    for request_id in candidates:
        record = store.get(request_id)
        if record is None or record.status not in (Status.IN_PROGRESS, Status.IN_QUEUE):
            continue
        if record.status == Status.IN_PROGRESS and _lease_alive(store, variant, request_id, now):
            continue  # claimed again meanwhile
        send_job(celery, record.spec)
        resent.append(request_id)
    if found:
        # The copy sent now (or waiting) has a lease's time to be claimed (it may wait behind a running job in
        # a worker's prefetch) before another is sent.
        pipe = store.redis.pipeline(transaction=False)
        for request_id in found:
            pipe.hset(keys.job(request_id), RESENT_FIELD, repr(now))
        pipe.execute()
    if resent:
        log.warning(
            "re-sent %d job(s) of %s whose broker message was gone: %s", len(resent), variant, resent[:5]
        )
    return resent
