"""Celery on Redis: one queue per model variant (webhooks do not go through Celery: deliverer/app.py).

The gateway and producer only *send* tasks by name; they never import worker code (or torch).
"""

from __future__ import annotations

import uuid

from celery import Celery

from common.adapters import broker
from common.adapters.redis_conn import celery_broker
from common.domain.schemas import JobSpec
from common.settings import BrokerSettings

RUN_JOB = "birefnet.run_job"
DEFAULT_QUEUE = "webhooks"  # where a task sent without a queue would go (none is; the name is historic)


def make_celery(settings: BrokerSettings, name: str = "birefnet") -> Celery:
    broker = celery_broker(settings)  # TLS, ACL and Sentinel options: common.adapters.redis_conn
    app = Celery(name, broker=broker.url)
    app.conf.update(
        broker_use_ssl=broker.use_ssl,
        broker_transport=broker.transport,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        # A message leaves Redis when a worker pops it (no ack emulation below); acks_late keeps a warm
        # shutdown's unstarted messages with the worker until it puts them back at close.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=DEFAULT_QUEUE,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            # No `unacked` hash and index per message (four commands per job, each carrying the body): a
            # killed worker's job comes back from its record instead (common/state/orphans.py).
            "ack_emulation": False,
            **broker.transport_options,
        },
        worker_hijack_root_logger=False,
        # Events cost a PUBLISH per task state; only an events consumer (Flower) reads them.
        worker_send_task_events=settings.celery_task_events,
        task_send_sent_event=settings.celery_task_events,
    )
    return app


# kombu's Redis transport keeps one list per priority step and pops step 0 first across all of a worker's
# queues, so `low` jobs (step 9) run only when no normal job of that worker's variants waits.
LOW_PRIORITY = 9


def send_job(app: Celery, spec: JobSpec) -> None:
    """Put a job on its variant's queue (the spec travels whole, so a lost record can be rebuilt)."""
    priority = LOW_PRIORITY if spec.priority == "low" else None
    app.send_task(
        RUN_JOB,
        args=[spec.model_dump(mode="json")],
        queue=spec.queue,
        priority=priority,
        argsrepr=_args_repr(spec),
    )


def job_message(app: Celery, spec: JobSpec) -> broker.StoredMessage:
    """The message `send_job` sends, built by Celery but not sent: for the script that records a new job to
    push it in the same call (one round trip, and never a record without its message or the reverse)."""
    task_id = str(uuid.uuid4())
    message = app.amqp.create_task_message(
        task_id,
        RUN_JOB,
        [spec.model_dump(mode="json")],
        {},
        reply_to=app.thread_oid,
        argsrepr=_args_repr(spec),
        ignore_result=None,  # as send_task leaves it (the app's task_ignore_result decides)
    )
    return broker.stored_message(
        spec.queue,
        headers=message.headers,
        properties=message.properties,
        body=message.body,
        priority=LOW_PRIORITY if spec.priority == "low" else None,
    )


def _args_repr(spec: JobSpec) -> str:
    """What Celery's logs and Flower show of a job's arguments: its id, not the whole spec (which is in the
    message's body already, and may carry a data URI)."""
    return f"[job {spec.request_id}]"
