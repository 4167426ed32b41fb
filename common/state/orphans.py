"""Re-sending jobs whose broker message was lost.

Kombu's Redis transport moves a message from the queue list to its `unacked` hash in two steps; a worker
killed between them loses the message. Workers therefore look for old IN_QUEUE jobs whose id is in
neither, and send them again; a duplicate is harmless (a job is claimed once).
"""

from __future__ import annotations

import logging
import time
from typing import cast

from celery import Celery

from common.adapters import broker
from common.adapters.queue import send_job
from common.domain.status import Status
from common.state import keys
from common.state.jobs import JobStore

log = logging.getLogger(__name__)

SCAN_LIMIT = 20_000  # beyond this many messages the check is skipped (a long queue is not an orphan's)


def _ids_with_messages(store: JobStore, queues: list[str]) -> set[str] | None:
    r = store.redis
    lists = [key for queue in queues for key in broker.queue_lists(queue)]
    if sum(r.llen(key) for key in lists) + r.hlen(broker.UNACKED) > SCAN_LIMIT:
        return None
    raws = [raw for key in lists for raw in r.lrange(key, 0, -1)] + r.hvals(broker.UNACKED)
    return {rid for message in map(broker.decode, raws) if message and (rid := message.job_request_id)}


def resend_orphans(store: JobStore, celery: Celery, variant: str, queue: str, *, min_age: float) -> list[str]:
    """Send again the IN_QUEUE jobs of `variant` older than `min_age` seconds that have no message."""
    lock = keys.orphan_scan(variant)
    if not store.redis.set(lock, "1", nx=True, ex=max(5, int(min_age / 2))):
        return []  # another worker just looked
    cutoff = time.time() - min_age
    candidates = []
    for request_id in cast(
        list[str], store.redis.zrange(keys.pending(variant), 0, 199)
    ):  # a decoding client: str replies
        record = store.get(request_id)
        if record and record.status == Status.IN_QUEUE and record.created_at < cutoff:
            candidates.append(record)
    if not candidates:
        return []
    present = _ids_with_messages(store, [queue])
    if present is None:
        return []
    resent = []
    for record in candidates:
        if record.request_id not in present and store.status(record.request_id) == Status.IN_QUEUE:
            send_job(celery, record.spec)
            resent.append(record.request_id)
    if resent:
        log.warning(
            "re-sent %d job(s) of %s whose broker message was lost: %s", len(resent), variant, resent[:5]
        )
    return resent
