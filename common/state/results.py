"""Ending a job: result document in the output bucket, then the record, then the webhook.

The order is the promise fal clients rely on: COMPLETED is visible only after the result is stored.
"""

from __future__ import annotations

import logging

from common.adapters.redis_conn import wait_for_replicas
from common.adapters.storage import RESULT_DOCUMENT, ObjectStore
from common.domain.errors import JobError, RequestCancelled
from common.domain.schemas import JobSpec
from common.settings import GatewaySettings, ProducerSettings, WorkerSettings
from common.state.jobs import Completed, JobStore, RunReport
from common.state.webhooks import first_attempt_due

log = logging.getLogger(__name__)


def finish_job(
    *,
    settings: GatewaySettings | ProducerSettings | WorkerSettings,
    store: JobStore,
    objects: ObjectStore | None,
    spec: JobSpec,
    body: dict,
    code: int = 200,
    error: str | None = None,
    error_type: str | None = None,
    token: str = "",
    inference_time: float | None = None,
    extra: dict | None = None,
    logs: list[str] | None = None,
    report: RunReport | None = None,
) -> Completed | None:
    """Store the outcome once; a Completed for the call that completed the job, else None. `logs`: the last
    stage's log lines (`jobs.log_entry`), stored with the outcome; `report`: a worker's completions-stream
    entry."""
    _write_result(settings, objects, spec, body, code, ok=error is None)
    # The first webhook attempt is booked and handed to the deliverers with the completion, in its script.
    done = store.complete(
        spec.request_id,
        token=token,
        result=body,
        result_code=code,
        error=error,
        error_type=error_type,
        inference_time=inference_time,
        extra=extra,
        variant=spec.variant,
        logs=logs,
        webhook_due=first_attempt_due(settings) if spec.webhook_url else None,
        report=report,
    )
    if done is not None and done.cancelled and error_type != RequestCancelled.error_type:
        # The completion recorded a cancel requested while the job ran: the result document says so too.
        cancelled = RequestCancelled()
        _write_result(settings, objects, spec, cancelled.body(), cancelled.status_code, ok=False)
    if done is not None:
        wait_for_replicas(store.redis, settings)  # a failover now must not forget the completion
    else:
        log.info("job %s was already completed elsewhere; outcome discarded", spec.request_id)
    return done


def _write_result(
    settings: GatewaySettings | ProducerSettings | WorkerSettings,
    objects: ObjectStore | None,
    spec: JobSpec,
    body: dict,
    code: int,
    *,
    ok: bool,
) -> None:
    """The result document in the output bucket (fal's output or error body), unless the run is sync."""
    if objects is None or spec.params.sync_mode:
        return
    objects.write_json(
        settings.output_bucket,
        spec.output_prefix + RESULT_DOCUMENT,
        body,
        metadata={"request-id": spec.request_id, "status": "OK" if ok else "ERROR", "status-code": str(code)},
    )


def fail_job(*, exc: JobError, **kwargs) -> Completed | None:
    """End the job with the error's own body and status."""
    return finish_job(
        body=exc.body(), code=exc.status_code, error=exc.message, error_type=exc.error_type, **kwargs
    )
