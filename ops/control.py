"""`ops pause|resume|drain|requeue`: steer the workers of one variant, bring dead letters back.

Pausing is two things: a Redis flag (workers starting later honour it, producers and the gateway can
show it) and Celery's `cancel_consumer` broadcast to the running workers. A worker busy with a job
hears the broadcast when the job ends, so right after a pause one more job may still start; `drain`
waits until every worker serving the variant confirms it stopped consuming and none of its jobs runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import redis
from celery import Celery

from common.adapters import broker
from common.adapters.queue import send_job
from common.settings import OpsSettings
from common.state import ops_state
from common.state.jobs import JobStore


class OpsError(Exception):
    """A command that cannot be carried out (unknown variant, job not in a requeueable state)."""


def _queue(settings: OpsSettings, variant: str) -> str:
    try:
        return settings.variants.get(variant).queue
    except KeyError:
        raise OpsError(f"unknown variant {variant!r}") from None


def _nodes(replies: list[dict] | None) -> list[str]:
    return sorted(node for reply in replies or [] for node in reply)


def serving_nodes(r: redis.Redis, variant: str) -> list[str]:
    """Celery node names of live workers serving the variant (one entry per worker process)."""
    return sorted(
        ops_state.celery_node(w["name"])
        for w in ops_state.live_workers(r)
        if variant in w.get("variants", [])
    )


def pause(r: redis.Redis, celery: Celery, settings: OpsSettings, variant: str, reason: str = "") -> dict:
    queue = _queue(settings, variant)
    ops_state.set_paused(r, variant, reason)
    # To every worker, also those whose heartbeat is late: cancelling a queue it does not consume is a no-op.
    replies = celery.control.cancel_consumer(queue, reply=True, timeout=1.0)
    serving = serving_nodes(r, variant)
    return {
        "variant": variant,
        "queue": queue,
        "paused": True,
        "workers_serving": len(serving),
        "acknowledged_by": [node for node in _nodes(replies) if node in serving],
    }


def resume(r: redis.Redis, celery: Celery, settings: OpsSettings, variant: str) -> dict:
    queue = _queue(settings, variant)
    was_paused = ops_state.clear_paused(r, variant)
    serving = serving_nodes(r, variant)
    replies: list[dict] = []
    if serving:
        # Only to the workers that serve it: add_consumer would make any worker take the queue.
        replies = celery.control.add_consumer(
            queue, reply=True, timeout=1.0, destination=sorted(set(serving))
        )
    return {
        "variant": variant,
        "queue": queue,
        "paused": False,
        "was_paused": was_paused,
        "workers_serving": len(serving),
        "acknowledged_by": _nodes(replies),
    }


def drain(
    r: redis.Redis,
    celery: Celery,
    settings: OpsSettings,
    variant: str,
    *,
    timeout: float = 600,
    poll: float = 1.0,
    progress: Callable[[dict], None] | None = None,
) -> dict:
    """Pause the variant and wait until its workers stopped consuming and run no job of it."""
    queue = _queue(settings, variant)
    # Jobs running when the drain begins count as finished by it, even if they end while pausing.
    seen_running = set(ops_state.running_jobs(r, [variant])[variant])
    paused = pause(r, celery, settings, variant, reason="drain")
    started = time.time()
    while True:
        running = set(ops_state.running_jobs(r, [variant])[variant])
        seen_running |= running
        serving = serving_nodes(r, variant)
        # A worker answers `active_queues` only between jobs; an answer without the queue confirms it.
        replies = (
            celery.control.broadcast(
                "active_queues", reply=True, timeout=min(poll, 1.0), destination=sorted(set(serving))
            )
            if serving
            else []
        )
        stopped = [
            node
            for reply in replies
            for node, queues in reply.items()
            if node in serving and not any(q.get("name") == queue for q in queues or [])
        ]
        state = {
            "variant": variant,
            "queue": queue,
            "running": sorted(running),
            "workers_serving": len(serving),
            "workers_stopped": len(stopped),
            "waited_seconds": round(time.time() - started, 1),
        }
        drained = not running and len(stopped) >= len(serving)
        if drained or time.time() - started > timeout:
            break
        if progress:
            progress(state)
        time.sleep(poll)
    return {
        **state,
        "drained": drained,
        "paused": True,
        "finished": sorted(seen_running - running),
        "left_in_queue": broker.depths(r, [queue])[queue],
        "acknowledged_by": paused["acknowledged_by"],
    }


def requeue(r: redis.Redis, celery: Celery, settings: OpsSettings, request_id: str) -> dict:
    """Give a dead-lettered (or otherwise failed) job a fresh start: IN_QUEUE, attempts 0, sent again."""
    store = JobStore(r, record_ttl=settings.job_record_ttl)
    # Attempt numbers a webhook of the old outcome may have booked (the first plus every retry).
    restart = store.restart_failed(request_id, webhook_attempts=settings.webhook_max_retries + 2)
    record = restart.previous
    if record is None:
        raise OpsError(f"no job record {request_id!r} (expired or never existed)")
    if restart.spec is None:
        raise OpsError(
            f"job {request_id} is {record.status}"
            f"{' and succeeded' if record.status.is_terminal else ''}; only failed jobs are requeued"
        )
    store.log(request_id, "requeued by ops: attempts reset", "WARN")
    send_job(celery, restart.spec)
    return {
        "request_id": request_id,
        "variant": restart.spec.variant,
        "queue": restart.spec.queue,
        "requeued": True,
        "was_dead_letter": restart.was_dead_letter,
        "previous_error": record.error,
    }
