"""The ops state a worker writes around each job: in the running set while it runs, then an entry in
the completions stream (what `python -m ops` and the queue gauges read)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from common.domain.schemas import JobSpec
from common.state import keys, ops_state
from common.state.jobs import JobStore

log = logging.getLogger(__name__)

COMPLETED = ("done", "failed", "cancelled")  # the runner's Outcome kinds that end a job


@dataclass(frozen=True)
class Completion:
    """A job's end as the worker saw it; queue_wait: seconds from created to started, if both are known."""

    outcome: str
    error_type: str
    queue_wait: float | None


def job_finished(
    store: JobStore,
    spec: JobSpec,
    outcome: str,
    timings: dict[str, float] | None = None,
    *,
    worker: str = "",
    keep: int = 100_000,
) -> Completion | None:
    """Record a run the worker is done with (`outcome`: the runner's Outcome.kind; `defer`: another
    worker holds the job); its Completion if it ended the job. Never raises: bookkeeping mustn't fail jobs."""
    try:
        if outcome == "defer":
            return None
        pipe = store.redis.pipeline(transaction=False)
        if outcome in COMPLETED:
            pipe.hmget(keys.job(spec.request_id), "created_at", "started_at", "completed_at", "error_type")
        ops_state.unmark_running(store.redis, spec.variant, spec.request_id, pipe)  # same round trip
        replies = pipe.execute()
        if outcome not in COMPLETED:
            return None
        created, started, completed, error_type = replies[0]
        queue_wait = float(started) - float(created) if started and created else None
        ops_state.record_completion(
            store.redis,
            {
                "request_id": spec.request_id,
                "variant": spec.variant,
                "outcome": outcome,
                "error_type": error_type or "",
                "worker": worker,
                "queue_wait": _rounded(queue_wait),
                "run": _rounded((timings or {}).get("total")),
                "latency": _rounded(float(completed) - float(created)) if completed and created else "",
            },
            keep=keep,
        )
        return Completion(outcome, str(error_type or ""), queue_wait)
    except Exception:
        log.warning("could not record the end of job %s", spec.request_id, exc_info=True)
        return None


def _rounded(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"
