"""`python -m ops` against a real redis-server, moto S3 and (where it matters) a real worker process."""

from __future__ import annotations

import json
import time
import uuid

import pytest
import redis
from rich.console import Console
from skimage import data as samples

from common.adapters.queue import make_celery, send_job
from common.adapters.storage import request_output_prefix
from common.domain.schemas import JobParams, JobSpec
from common.state import keys, ops_state
from common.state.jobs import JobStore
from common.state.webhooks import Attempt, attempt_fields
from ops import cli, control, render
from ops.status import gather_status, percentile
from producer.intake import build_intake
from producer.notifications import ObjectCreated
from tests.helpers.images import array_png
from tests.helpers.pipeline import put
from tests.helpers.stack import Stack, wait_for


def submit(stack: Stack, key: str, body: bytes = b"img", metadata: dict | None = None) -> str:
    """Upload an object and hand its event to the producer's intake (the SQS/HTTP path minus transport)."""
    put(stack, key, metadata or {}, body=body)
    return build_intake(stack.settings).handle(
        ObjectCreated(stack.settings.input_bucket, key, None, None, None, "ObjectCreated:Put")
    )


def client(stack: Stack) -> redis.Redis:
    return redis.Redis.from_url(stack.settings.redis_url, decode_responses=True)


def test_percentile_is_nearest_rank():
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([float(v) for v in range(1, 101)], 95) == 95.0


def test_status_counts_queues_workers_completions_and_failures(stack: Stack, capsys):
    settings, r = stack.settings, client(stack)
    now = time.time()
    # A completion from before the window must not count.
    r.xadd(
        keys.COMPLETIONS,
        {"variant": "general-light", "outcome": "done", "latency": "99"},
        id=f"{int((now - 7200) * 1000)}-0",
    )

    ids = [submit(stack, f"q/{n}.png") for n in range(3)]
    store = JobStore(r)
    store.redis.hset(keys.job(ids[0]), "created_at", repr(now - 120))  # the oldest has waited 2 min
    low = JobSpec(
        request_id=str(uuid.uuid4()),
        variant="general-light",
        image_url="s3://x/y.png",
        params=JobParams(),
        output_prefix="results/requests/x/",
        priority="low",
    )
    store.create(low)
    send_job(make_celery(settings), low)  # kombu keeps low priority in its own list

    ops_state.publish_heartbeat(
        r,
        "general-light@gpu-a:11",
        {
            "name": "general-light@gpu-a:11",
            "variants": ["general-light"],
            "untrained": ["general-light"],
            "device": "cuda:0",
            "started_at": now - 600,
        },
    )
    ops_state.set_paused(r, "general-heavy", "maintenance")
    for n in range(10):
        ops_state.record_completion(
            r,
            {
                "variant": "general-light",
                "outcome": "done",
                "latency": n + 1,
                "run": 0.5,
                "queue_wait": n / 10,
            },
            keep=1000,
        )
    ops_state.record_completion(
        r,
        {"variant": "general-light", "outcome": "failed", "error_type": "image_load_error", "latency": 0.01},
        keep=1000,
    )
    # Webhooks: one gave up after every retry, one is retrying after a failed attempt.
    for rid, member in (("hook-gone", None), ("hook-retry", "hook-retry|1")):
        failed = Attempt(attempt=0, at=now, status_code=500, ok=False, error="HTTP 500")
        r.hset(keys.job(rid), mapping=attempt_fields(failed))  # as the deliverer records it
        if member:
            r.zadd(keys.WEBHOOK_DUE, {member: now + 30})
        else:
            r.zadd(keys.WEBHOOK_FAILED, {rid: now})
    r.zadd(keys.DEADLETTER, {ids[2]: now})

    data = gather_status(r, settings, window=600, now=now + 1)
    light = data["variants"]["general-light"]
    assert light["queued_messages"] == 4 and light["waiting_jobs"] == 4
    assert 119 < light["oldest_waiting_seconds"] < 130
    assert light["in_progress"] == 0 and light["workers"] == ["general-light@gpu-a:11"]
    assert light["untrained_workers"] == ["general-light@gpu-a:11"]
    assert (light["completed"], light["done"], light["failed"]) == (11, 10, 1)
    assert light["jobs_per_minute"] == pytest.approx(11 / 10)
    assert (light["latency_p50"], light["latency_p95"]) == (5.0, 10.0)
    assert light["errors"] == {"image_load_error": 1}
    assert data["variants"]["general-heavy"]["paused"] and not light["paused"]
    assert "portrait" not in data["variants"], "idle variants are left out unless --all"
    assert data["untrained_variants"] == ["general-light"]
    assert data["webhooks"]["failed"] == 1 and data["webhooks"]["retrying"] == 1
    assert data["webhooks"]["recent_failures"][0]["last_error"] == "HTTP 500"
    assert data["webhooks"]["recent_failures"][0]["attempts"] == 1
    assert data["deadletters"]["count"] == 1 and data["deadletters"]["entries"][0]["request_id"] == ids[2]

    # The command line prints the same data as JSON, and the tables flag untrained weights.
    assert cli.main(["--redis-url", settings.redis_url, "status", "--json", "--all"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["variants"]["general-light"]["queued_messages"] == 4 and "portrait" in printed["variants"]
    console = Console(record=True, width=160)
    console.print(render.status_view(data))
    text = console.export_text()
    assert "UNTRAINED" in text and "PAUSED" in text and "dead letters: 1" in text


def status_of(stack: Stack, request_id: str) -> str | None:
    return JobStore.from_url(stack.settings.redis_url).status(request_id)


def completed(stack: Stack, request_id: str, timeout: float = 120) -> None:
    wait_for(lambda: status_of(stack, request_id) == "COMPLETED", timeout, f"job {request_id} to complete")


@pytest.mark.timeout(300)
def test_pause_resume_and_drain_steer_a_running_worker(stack: Stack):
    settings, r = stack.settings, client(stack)
    celery = make_celery(settings)
    stack.start_worker("general-light")
    wait_for(lambda: celery.control.ping(timeout=0.5), 60, "the worker to answer control commands")

    paused = control.pause(r, celery, settings, "general-light")
    assert paused["workers_serving"] == 1 and all(
        n.startswith("general-light@") for n in paused["acknowledged_by"]
    )
    job = submit(stack, "ops/a.png", array_png(samples.astronaut()))
    time.sleep(3)
    assert status_of(stack, job) == "IN_QUEUE", "a paused variant's jobs stay queued"
    view = gather_status(r, settings)["variants"]["general-light"]
    assert view["paused"] and view["queued_messages"] == 1 and len(view["workers"]) == 1

    resumed = control.resume(r, celery, settings, "general-light")
    assert resumed["was_paused"] and resumed["workers_serving"] == 1
    wait_for(
        lambda: gather_status(r, settings)["variants"]["general-light"]["in_progress_ids"] == [job],
        60,
        "the job to run once resumed",
        interval=0.05,
    )

    # Drain while it runs: the job finishes, the worker stops consuming, later jobs wait.
    drained = control.drain(r, celery, settings, "general-light", timeout=120, poll=0.5)
    assert drained["drained"] and drained["finished"] == [job] and drained["running"] == []
    assert drained["workers_stopped"] == drained["workers_serving"] == 1
    assert status_of(stack, job) == "COMPLETED"
    later = submit(stack, "ops/b.png", array_png(samples.astronaut()))
    time.sleep(3)
    assert status_of(stack, later) == "IN_QUEUE", "a drained variant stays paused"

    stats = gather_status(r, settings)["variants"]["general-light"]
    assert stats["done"] == 1 and stats["in_progress"] == 0 and stats["waiting_jobs"] == 1 and stats["paused"]
    assert stats["latency_p50"] > stats["run_p50"] > 0 and stats["queue_wait_p50"] > 2.5


@pytest.mark.timeout(300)
def test_a_worker_started_while_paused_leaves_the_queue_alone_and_requeue_revives_a_dead_letter(
    stack: Stack, capsys
):
    settings, r = stack.settings, client(stack)
    celery = make_celery(settings)
    store = JobStore(r)
    # A job that already used up its attempts: the worker's claim dead-letters it.
    put(stack, "dead/astronaut.png", {}, body=array_png(samples.astronaut()))
    rid = str(uuid.uuid4())
    spec = JobSpec(
        request_id=rid,
        variant="general-light",
        params=JobParams(),
        image_url=f"s3://{settings.input_bucket}/dead/astronaut.png",
        output_prefix=request_output_prefix(settings, rid),
    )
    store.create(spec)
    store.redis.hset(
        keys.job(rid),
        mapping={"attempts": settings.max_job_attempts, "last_error": "RuntimeError: CUDA error"},
    )
    send_job(celery, spec)

    control.pause(r, celery, settings, "general-light", reason="test")
    stack.start_worker("general-light")
    time.sleep(4)
    assert store.status(rid) == "IN_QUEUE", (
        "a worker that starts while its variant is paused does not consume"
    )
    control.resume(r, celery, settings, "general-light")
    completed(stack, rid)
    record = store.get(rid)
    assert record.error_type == "runner_disconnected" and "CUDA error" in record.error

    assert cli.main(["--redis-url", settings.redis_url, "--json", "deadletters"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["count"] == 1 and listed["entries"][0]["last_error"] == "RuntimeError: CUDA error"

    assert cli.main(["--redis-url", settings.redis_url, "requeue", rid]) == 0
    assert "requeued" in capsys.readouterr().out
    wait_for(
        lambda: (rec := store.get(rid)) is not None and rec.status == "COMPLETED" and rec.ok,
        120,
        "the requeued job to succeed",
    )
    record = store.get(rid)
    assert record.attempts == 1 and record.result["image"]["width"] == 512
    assert r.zcard(keys.DEADLETTER) == 0
    assert cli.main(["--redis-url", settings.redis_url, "requeue", rid]) == 2, (
        "a succeeded job is not requeued"
    )
