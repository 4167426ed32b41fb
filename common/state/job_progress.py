"""The ops state around each job: in the running set while it runs, then an entry in the completions
stream (what `python -m ops` and the queue gauges read). The claim and completion scripts
(common.state.jobs) write both (the requeue of a run that gives its job back too); what is left here is an
occasional prune and the metrics."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from common.domain.schemas import JobSpec
from common.state import ops_state
from common.state.jobs import Completed, JobStore

log = logging.getLogger(__name__)

COMPLETED = ("done", "failed", "cancelled")  # the runner's Outcome kinds that end a job


@dataclass(frozen=True)
class Completion:
    """A job's end as the worker saw it; queue_wait: seconds from created to started, if both are known."""

    outcome: str
    error_type: str
    queue_wait: float | None


def job_finished(
    store: JobStore, spec: JobSpec, outcome: str, completed: Completed | None
) -> Completion | None:
    """A run the worker is done with (`outcome`: the runner's Outcome.kind; `completed`: what its
    completion recorded, if it ended the job); its Completion if it ended the job. The claim and the
    completion keep the running set and the completions stream themselves (a run that gives its job back
    takes it out of the running set with the requeue). Never raises: bookkeeping mustn't fail jobs."""
    try:
        ops_state.prune_running(store.redis, spec.variant)
        if outcome not in COMPLETED or completed is None:
            return None
        return Completion(outcome, completed.error_type, completed.queue_wait)
    except Exception:
        log.warning("could not record the end of job %s", spec.request_id, exc_info=True)
        return None
