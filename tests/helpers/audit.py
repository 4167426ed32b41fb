"""What became of every accepted job after a chaos run: results, webhooks, runs, stuck records, and the
Celery side of one job (no tests here). Submitting and waiting for completions are devstack/load.py's."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import redis

from common.adapters import broker
from common.adapters.storage import RESULT_DOCUMENT
from common.state.jobs import JobStore
from devstack.load import Submitted, expected_ids, job_records, jobs_by_key
from devstack.receiver import WebhookReceiver
from tests.helpers.faults import ChaosStack

DONE_LINE = re.compile(r"^done in ")  # the runner's last job log line, written once per finished run


def log_lines(store: JobStore, request_id: str) -> list[str]:
    return [entry["message"] for entry in store.logs(request_id)]


def result_versions(stack: ChaosStack) -> Counter:
    """Stored versions of every result document, by key (the output bucket is versioned: a document written
    twice has two). One listing of the whole bucket."""
    versions: Counter = Counter()
    paginator = stack.s3_direct().get_paginator("list_object_versions")
    for page in paginator.paginate(Bucket=stack.settings.output_bucket, Prefix=stack.settings.output_prefix):
        versions.update(
            v["Key"] for v in page.get("Versions", []) if v["Key"].endswith("/" + RESULT_DOCUMENT)
        )
    return versions


@dataclass
class Audit:
    jobs: int
    ok: int
    failed: dict[str, str]  # request id -> error type
    runs_started: int  # claims that got as far as loading the image
    runs_finished: Counter  # request id -> "done in" log lines
    result_docs: Counter  # request id -> result.json objects under its prefix (must be 1)
    result_writes: Counter  # request id -> versions of that document
    webhooks: Counter  # request id -> deliveries received
    jobs_per_key: dict[str, int]
    stuck: list[str]  # any record still IN_QUEUE / IN_PROGRESS
    unexpected_webhooks: list[str]

    @property
    def duplicates(self) -> dict[str, str]:
        """Jobs done more than once, in any of the ways that could show it."""
        out = {}
        for rid, n in self.runs_finished.items():
            if n > 1:
                out[rid] = f"{n} finished runs"
        for rid, n in self.webhooks.items():
            if n != 1:
                out[rid] = f"{n} webhooks"
        for rid, n in self.result_docs.items():
            if n != 1:
                out[rid] = f"{n} result documents"
        for key, n in self.jobs_per_key.items():
            if n != 1:
                out[key] = f"{n} jobs for one upload"
        return out

    def summary(self) -> dict:
        return {
            "jobs": self.jobs,
            "ok": self.ok,
            "failed": len(self.failed),
            "runs_started": self.runs_started,
            "reruns": self.runs_started - self.jobs,
            "result_doc_rewrites": sum(self.result_writes.values()) - self.jobs,
            "duplicates": len(self.duplicates),
            "stuck": len(self.stuck),
            "unexpected_webhooks": len(self.unexpected_webhooks),
        }


def audit(stack: ChaosStack, submitted: Submitted, receiver: WebhookReceiver | None) -> Audit:
    store = stack.store()
    records = job_records(store)
    ids = expected_ids(submitted, records, stack.settings.input_bucket) or []
    webhooks = (
        Counter(item.json()["request_id"] for item in list(receiver.received)) if receiver else Counter()
    )
    result_docs: Counter = Counter()
    result_writes: Counter = Counter()
    runs_finished: Counter = Counter()
    runs_started = 0
    versions = result_versions(stack)
    for rid in ids:
        written = versions.get(records[rid].spec.output_prefix + RESULT_DOCUMENT, 0)
        result_writes[rid] = written
        result_docs[rid] = 1 if written else 0  # one key per job; its versions are rewrites
        lines = log_lines(store, rid)
        runs_finished[rid] = sum(bool(DONE_LINE.match(line)) for line in lines)
        runs_started += sum(line == "loading image" for line in lines)
    by_key = jobs_by_key(records, stack.settings.input_bucket)
    result = Audit(
        jobs=len(ids),
        ok=sum(records[rid].ok for rid in ids),
        failed={rid: records[rid].error_type or "" for rid in ids if not records[rid].ok},
        runs_started=runs_started,
        runs_finished=runs_finished,
        result_docs=result_docs,
        result_writes=result_writes,
        webhooks=Counter({rid: webhooks.get(rid, 0) for rid in ids}),
        jobs_per_key={key: len(by_key.get(key, [])) for key in submitted.s3_keys},
        stuck=sorted(rid for rid, r in records.items() if r.status != "COMPLETED"),
        unexpected_webhooks=sorted(set(webhooks) - set(ids)),
    )
    store.redis.close()
    return result


def job_of_message(raw: str | bytes) -> tuple[str | None, str | None]:
    """(request id, task id) of a raw kombu message (a queue list entry)."""
    message = broker.decode(raw)
    if message is None or message.spec is None:
        return None, None
    return message.job_request_id, message.task_id


def messages_of(r: redis.Redis, request_id: str, queue: str) -> int:
    """Broker messages carrying the job waiting in the queue's lists (a worker's are gone from Redis)."""
    waiting = [raw for name in broker.queue_lists(queue) for raw in r.lrange(name, 0, -1)]
    return sum(job_of_message(raw)[0] == request_id for raw in waiting)
