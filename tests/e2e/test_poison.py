"""Poison jobs end: a request that makes its worker die every time is retried a bounded number of times
(BIREFNET_MAX_JOB_ATTEMPTS), then completes with an error, lands in the dead-letter list, and
`python -m ops` lists it and, once the cause is fixed, requeues it.

The poison is real: a 36-megapixel PNG of ~100 KB (well inside the input limits) whose decoding, refinement
and encoding need about a gigabyte more than a small job (9 megapixels were enough before the worker's CPU
path got lean). The worker runs under a memory limit that the test enforces the way the
kernel's OOM killer (or a container runtime) does: SIGKILL when its resident memory passes the limit, then a
fresh worker, as a restart policy would start. Everything else is the real stack: redis-server, moto,
`python -m gateway`, the webhook deliverer and `python -m worker` processes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from common.state import keys
from devstack.receiver import WebhookReceiver
from tests.helpers.audit import log_lines
from tests.helpers.faults import ChaosStack, GatewaySubmitter, OomKiller, resident_mb
from tests.helpers.images import data_uri, flat_png, small_png
from tests.helpers.stack import ROOT, wait_for

MAX_ATTEMPTS = 2
HEADROOM_MB = 400  # the limit above a warm worker's resident memory; the poison needs ~1 GB more


@pytest.fixture
def receiver():
    hooks = WebhookReceiver().start()
    yield hooks
    hooks.stop()


def ops(stack: ChaosStack, *args: str) -> subprocess.CompletedProcess:
    """`python -m ops --redis-url ... <args>` as an operator would run it."""
    return subprocess.run(
        [sys.executable, "-m", "ops", "--redis-url", stack.settings.redis_url, *args],
        cwd=ROOT,
        env=stack.stack.env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def webhooks_for(receiver: WebhookReceiver, request_id: str) -> list[dict]:
    return [
        body for body in (item.json() for item in list(receiver.received)) if body["request_id"] == request_id
    ]


@pytest.mark.timeout(420)
def test_a_job_that_kills_its_worker_is_dead_lettered_listed_and_requeued(
    moto_endpoint: str, tmp_path: Path, receiver: WebhookReceiver
):
    stack = ChaosStack(tmp_path, moto_endpoint, overrides={"BIREFNET_MAX_JOB_ATTEMPTS": str(MAX_ATTEMPTS)})
    try:
        stack.start(workers=1, producer=False)
        store = stack.store()
        client = GatewaySubmitter(stack.gateway_url, receiver.url)
        first = client.submit({"image_url": data_uri(small_png(1))})
        wait_for(lambda: store.status(first) == "COMPLETED", 60, "a small job on the warm worker")
        (worker,) = stack.live_workers()
        limit = resident_mb(worker.pid) + HEADROOM_MB

        with OomKiller(stack, limit) as killer:
            poison = client.submit({"image_url": data_uri(flat_png(6000))})
            healthy = client.submit({"image_url": data_uri(small_png(2))})
            wait_for(lambda: store.status(poison) == "COMPLETED", 300, "the poison job to end")
        wait_for(lambda: webhooks_for(receiver, poison), 30, "the poison job's webhook")

        # Killed once per allowed attempt, then ended by the next claim instead of killing a third worker.
        record = store.get(poison)
        print(
            f"poison figures: limit {limit:.0f} MB, killed at {killer.kills} MB, attempts {record.attempts}"
        )
        assert len(killer.kills) == MAX_ATTEMPTS and all(mb > limit for mb in killer.kills)
        assert record.error_type == "runner_disconnected" and record.result_code == 503
        assert (
            record.attempts == MAX_ATTEMPTS + 1
            and log_lines(store, poison).count("loading image") == MAX_ATTEMPTS
        )
        assert store.redis.zscore(keys.DEADLETTER, poison) is not None
        (hook,) = webhooks_for(receiver, poison)
        assert hook["status"] == "ERROR" and "dead-letter" in hook["error"]
        document = stack.s3_direct().head_object(
            Bucket=stack.settings.output_bucket, Key=record.spec.output_prefix + "result.json"
        )
        assert document["Metadata"]["status"] == "ERROR"
        # Other work went on between the deaths.
        wait_for(lambda: store.status(healthy) == "COMPLETED", 60, "the healthy job")
        wait_for(
            lambda: webhooks_for(receiver, healthy), 30, "the healthy job's webhook"
        )  # sent after COMPLETED
        assert store.get(healthy).ok and len(webhooks_for(receiver, healthy)) == 1

        listed = ops(stack, "--json", "deadletters")
        assert listed.returncode == 0, listed.stderr
        entries = json.loads(listed.stdout)["entries"]
        assert [(e["request_id"], e["attempts"], e["status"]) for e in entries] == [(poison, 3, "COMPLETED")]
        assert "failed 2 times" in entries[0]["error"]

        # The operator gives the workers more memory (the OOM killer is gone) and requeues the job.
        requeued = ops(stack, "requeue", poison)
        assert requeued.returncode == 0 and "requeued" in requeued.stdout, requeued.stdout + requeued.stderr
        wait_for(
            lambda: (r := store.get(poison)) is not None and r.status == "COMPLETED" and r.ok,
            180,
            "the requeued job to succeed",
        )
        assert store.get(poison).attempts == 1
        assert store.redis.zcard(keys.DEADLETTER) == 0
        hooks = wait_for(
            lambda: (h := webhooks_for(receiver, poison)) and len(h) == 2 and h,
            30,
            "the webhook of the new outcome",
        )
        assert [h["status"] for h in hooks] == ["ERROR", "OK"]
        assert hooks[1]["payload"]["image"]["width"] == 6000
        client.close()
    finally:
        stack.close()
