"""A worker killed mid-job: its job is redelivered within seconds and completes exactly once."""

from __future__ import annotations

import io
import os
import signal
import time

import numpy as np
import pytest
from PIL import Image

from common.jobs import JobStore
from tests.conftest import Stack, WebhookReceiver, wait_for
from tests.test_pipeline_e2e import s3_client


@pytest.mark.timeout(300)
def test_killed_worker_job_is_redelivered_and_done_once(stack: Stack, webhook_receiver: WebhookReceiver):
    settings = stack.settings
    stack.start(["-m", "producer", "sqs"], "producer")
    stack.start(["-m", "producer", "webhooks"], "webhooks")
    doomed = stack.start_worker("general-light", name="doomed")
    store = JobStore.from_url(settings.redis_url)

    # A 12-megapixel upload keeps the first worker busy long enough to be killed mid-job.
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, size=(3000, 4000, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=85)
    s3_client(settings).put_object(Bucket=settings.input_bucket, Key="big.jpg", Body=buffer.getvalue(),
                                   Metadata={"webhook_url": webhook_receiver.url,
                                             "operating_resolution": "2048x2048"})

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
    assert record.completed_at - killed_at < 90, "redelivered within seconds, not minutes"
    time.sleep(3)
    assert len(webhook_receiver.received) == 1, "exactly one webhook"
