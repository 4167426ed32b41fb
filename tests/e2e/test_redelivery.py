"""A worker killed mid-job (even mid-redelivery-sweep): its job is redelivered within seconds and completes
exactly once."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from common.adapters.queue import make_celery
from common.state.jobs import JobStore
from devstack.receiver import WebhookReceiver
from tests.forward_hook import Rule, hook_setting
from tests.helpers.images import marker_png
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
    # The worker dies in the middle of the broker's redelivery sweep: it holds the sweep's lock, taken as
    # its transport takes it (kombu's default would keep it, and every redelivery, for 5 minutes).
    with make_celery(settings).connection_for_write() as conn:
        channel = conn.default_channel
        lock = channel.client.lock(channel.unacked_mutex_key, timeout=channel.unacked_mutex_expire)
        wait_for(lambda: lock.acquire(blocking=False), 30, "the redelivery sweep's lock")
    os.kill(doomed.pid, signal.SIGKILL)
    doomed.wait()
    killed_at = time.time()
    stack.start_worker("general-light", name="rescuer")

    (delivery,) = webhook_receiver.wait(1, timeout=180)
    assert delivery.json()["status"] == "OK" and delivery.json()["request_id"] == request_id
    record = store.get(request_id)
    assert record.status == "COMPLETED" and record.attempts == 2, "run once by each worker, completed once"
    assert record.completed_at - killed_at < 90, "redelivered within seconds, not minutes"
    time.sleep(3)
    assert len(webhook_receiver.received) == 1, "exactly one webhook"
