"""A worker killed mid-job: its job is redelivered within seconds (from its record: the message left Redis
with the worker) and completes exactly once, with one webhook."""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

import pytest

from common.adapters import broker
from common.adapters.queue import RUN_JOB, make_celery, send_job
from common.adapters.storage import request_output_prefix
from common.domain.schemas import JobParams, JobSpec
from common.state.jobs import JobStore
from devstack.receiver import WebhookReceiver
from tests.forward_hook import Rule, hook_setting
from tests.helpers.images import data_uri, marker_png, small_png
from tests.helpers.pipeline import s3_client
from tests.helpers.stack import Stack, wait_for

SLOW_WIDTH = 64  # the hook's marker (no other test image is 64 pixels wide)


@pytest.mark.timeout(300)
def test_killed_worker_job_is_redelivered_and_done_once(
    stack: Stack, webhook_receiver: WebhookReceiver, tmp_path: Path
):
    settings = stack.settings
    stack.start(["-m", "producer", "sqs"], "producer")
    stack.start(["-m", "deliverer"], "webhooks")
    # The first worker's forward of this image takes a minute (the test-only hook), whatever the CPU, so it
    # is surely killed mid-job; the rescuer runs it normally.
    slow = hook_setting(tmp_path / "hook", Rule(SLOW_WIDTH, seconds=60))
    doomed = stack.start_worker(
        "general-light", name="doomed", extra_env={"BIREFNET_TEST_FORWARD_HOOK": slow}
    )
    store = JobStore.from_url(settings.redis_url)
    s3_client(settings).put_object(
        Bucket=settings.input_bucket,
        Key="slow.png",
        Body=marker_png(SLOW_WIDTH),
        Metadata={"webhook_url": webhook_receiver.url},
    )

    def running_job() -> str | None:
        for key in store.redis.scan_iter("birefnet:job:*"):
            if key.count(":") == 2 and store.redis.hget(key, "status") == "IN_PROGRESS":
                return key.rsplit(":", 1)[1]
        return None

    request_id = wait_for(running_job, 120, "the first worker to start the job", interval=0.02)
    os.kill(doomed.pid, signal.SIGKILL)
    doomed.wait()
    killed_at = time.time()
    stack.start_worker("general-light", name="rescuer")

    (delivery,) = webhook_receiver.wait(1, timeout=180)
    assert delivery.json()["status"] == "OK" and delivery.json()["request_id"] == request_id
    record = store.get(request_id)
    assert record.status == "COMPLETED" and record.attempts == 2, "run once by each worker, completed once"
    # Its lease (6 s here) expires, the next sweep (every lease/6 s) sends it again: seconds, not minutes
    # (the slack is the rescuer's start-up: loading its model).
    assert record.completed_at - killed_at < 60, "redelivered within seconds, not minutes"
    time.sleep(3)
    assert len(webhook_receiver.received) == 1, "exactly one webhook"


@pytest.mark.timeout(300)
def test_warm_shutdown_puts_back_what_the_worker_took_and_did_not_finish(stack: Stack, tmp_path: Path):
    """SIGTERM (a rollout, a scale-down) while a worker runs a job and jobs wait: the running one finishes,
    messages it took but did not start go back to the queue at close, and every job completes once."""
    settings = stack.settings
    store = JobStore.from_url(settings.redis_url)
    celery = make_celery(settings)
    slow = hook_setting(tmp_path / "hook", Rule(SLOW_WIDTH, seconds=4))
    first = stack.start_worker(
        "general-light", name="leaving", extra_env={"BIREFNET_TEST_FORWARD_HOOK": slow}
    )

    def job(image: bytes, countdown: float | None = None) -> JobSpec:
        rid = str(uuid.uuid4())
        spec = JobSpec(
            request_id=rid,
            variant="general-light",
            params=JobParams(),
            image_url=data_uri(image),
            output_prefix=request_output_prefix(settings, rid),
        )
        store.create(spec)
        if countdown is None:
            send_job(celery, spec)
        else:  # as a retry is sent: a worker takes it at once and holds it until it is due
            celery.send_task(
                RUN_JOB, args=[spec.model_dump(mode="json")], queue=spec.queue, countdown=countdown
            )
        return spec

    jobs = [job(marker_png(SLOW_WIDTH))] + [job(small_png(n)) for n in range(6)]
    wait_for(lambda: store.status(jobs[0].request_id) == "IN_PROGRESS", 60, "the slow job to start")
    held = job(small_png(99), countdown=45)  # due well after the worker has left, even on a slow machine
    jobs.append(held)

    def in_queue() -> set[str | None]:
        return {
            message.job_request_id
            for raw in store.redis.lrange(held.queue, 0, -1)
            if (message := broker.decode(raw))
        }

    wait_for(lambda: held.request_id not in in_queue(), 25, "the worker to take the held job")
    first.send_signal(signal.SIGTERM)
    first.wait(timeout=60)
    stopped_at = time.time()
    statuses = {spec.request_id: store.status(spec.request_id) for spec in jobs}
    assert statuses[jobs[0].request_id] == "COMPLETED", "the running job finished before the worker left"
    left = [rid for rid, status in statuses.items() if status != "COMPLETED"]
    queued = in_queue()
    assert held.request_id in queued, "the message it held (taken, not started) was put back at close"
    assert set(left) <= queued, "every job it took and did not finish is back in the queue"

    stack.start_worker("general-light", name="staying")
    wait_for(
        lambda: all(store.status(spec.request_id) == "COMPLETED" for spec in jobs), 120, "every job done"
    )
    for spec in jobs:
        record = store.get(spec.request_id)
        assert record.ok and record.attempts == 1, f"{spec.request_id} ran once"
    assert time.time() - stopped_at < 120
