"""Chaos: jobs keep flowing through the gateway and S3 events while workers are killed mid-job, Redis
crashes and comes back, and S3 goes away for a while. Afterwards every accepted job has exactly one result
document and exactly one webhook, none ran to completion twice, nothing is stuck.

Everything is real: redis-server (AOF, fsync always), moto over HTTP behind a TCP proxy that the test cuts,
`python -m gateway`, `python -m producer sqs|webhooks`, `python -m worker` processes killed with
SIGKILL. Size: CHAOS_JOBS (default 100, CI) and CHAOS_KILLS; `make chaos` runs several hundred jobs.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from pathlib import Path

import pytest

from common.adapters.queue import make_celery, send_job
from common.adapters.storage import request_output_prefix
from common.domain.schemas import JobParams, JobSpec
from common.state import keys
from devstack.load import Submitted, wait_all_done
from devstack.loopback import VARIANT, loopback_values
from devstack.receiver import WebhookReceiver
from tests.forward_hook import Rule, hook_setting
from tests.helpers.audit import audit, log_lines, messages_of
from tests.helpers.faults import ChaosStack, running_in_background, submit_mixed, upload
from tests.helpers.images import data_uri, marker_png, small_png
from tests.helpers.stack import wait_for

JOBS = int(os.environ.get("CHAOS_JOBS", "100"))
KILLS = int(os.environ.get("CHAOS_KILLS", str(max(4, JOBS // 50))))
RATE = float(os.environ.get("CHAOS_RATE", "2.5"))  # submissions per second (two workers do ~3/s here)
# The slow job: an image of this width, whose forward the test-only hook makes last SLOW_LEASES job leases
# plus a second, on any machine (tests/forward_hook.py).
SLOW_WIDTH, SLOW_LEASES = 63, 3


@pytest.fixture
def chaos(moto_endpoint: str, tmp_path: Path):
    lease = int(loopback_values()["BIREFNET_JOB_LEASE_SECONDS"])
    slow = Rule(SLOW_WIDTH, seconds=SLOW_LEASES * lease + 1)
    stack = ChaosStack(
        tmp_path,
        moto_endpoint,
        overrides={"BIREFNET_TEST_FORWARD_HOOK": hook_setting(tmp_path / "hook", slow)},
    )
    try:
        yield stack
    finally:
        stack.close()


@pytest.fixture
def receiver():
    hooks = WebhookReceiver().start()
    yield hooks
    hooks.stop()


def watch_slow_job(stack: ChaosStack, key: str, timeout: float = 120) -> str:
    """Wait for the slow upload's job to run; its request id."""
    store = stack.store()

    def running() -> str | None:
        for rid in store.redis.zrange(f"birefnet:running:{VARIANT}", 0, -1):
            record = store.get(rid)
            if record and record.spec.image_url.endswith(key) and record.status == "IN_PROGRESS":
                return rid
        return None

    return wait_for(running, timeout, "the slow job to start", interval=0.05)


def chaos_events(stack: ChaosStack, submitted: Submitted, avoid: set[str], figures: dict) -> None:
    """KILLS kills spread over the submissions (the n-th once n/(KILLS+2) of the jobs are in), the Redis
    crash and the S3 outage after the first two; each while a worker is in the middle of a job."""
    for n in range(KILLS):
        wait_for(
            lambda n=n: len(submitted.api) + len(submitted.s3_keys) >= (n + 1) * JOBS / (KILLS + 2),
            JOBS / RATE * 3,
            "the submissions to move on",
        )
        # Generous waits: a worker started just before may still be importing torch on a loaded machine.
        killed = stack.kill_busy_worker(avoid, timeout=240)
        avoid.add(killed)  # never the same job twice: three deaths would dead-letter it by design
        figures["kills"] += 1
        stack.start_worker(wait=False)
        if n == 0:
            stack.busy_worker(timeout=240)
            stack.crash_redis(down_seconds=1.5)
        if n == 1:
            stack.busy_worker(timeout=240)
            stack.s3_outage(seconds=6)
            figures["s3_outage_seconds"] += 6


@pytest.mark.slow  # full size under `make chaos` (CHAOS_JOBS / LOAD_JOBS)
@pytest.mark.timeout(900)
def test_chaos_nothing_lost_nothing_twice(chaos: ChaosStack, receiver: WebhookReceiver):
    started = time.time()
    chaos.start(workers=2)
    figures = {
        "jobs_submitted": JOBS + 1,
        "kills": 0,
        "s3_outage_seconds": 0,
        "startup_seconds": round(time.time() - started, 1),
    }
    submitted = Submitted()
    stop = threading.Event()

    # A job running several leases: its worker renews the lease, so the sweep for dead workers' jobs leaves
    # it alone.
    slow_key = "slow/marker.png"
    upload(
        chaos.s3_direct(),
        chaos.settings.input_bucket,
        slow_key,
        marker_png(SLOW_WIDTH),
        {"webhook_url": receiver.url},
    )
    submitted.s3_keys.append(slow_key)
    slow_id = watch_slow_job(chaos, slow_key)

    with running_in_background(lambda: submit_mixed(chaos, JOBS, RATE, receiver.url, submitted, stop)):
        try:
            store = chaos.store()
            wait_for(lambda: store.status(slow_id) == "COMPLETED", 180, "the slow job to complete")
            chaos_events(chaos, submitted, {slow_id}, figures)
        except BaseException:
            stop.set()  # end the submitter too
            raise

    ids = wait_all_done(chaos, submitted, receiver, timeout=max(300, JOBS * 1.5))
    time.sleep(4)  # room for anything that would arrive twice
    result = audit(chaos, submitted, receiver)
    figures.update(
        result.summary(),
        worker_starts=chaos.worker_starts,
        redis_restarts=chaos.redis_restarts,
        submits_refused_and_retried=submitted.refused,
        elapsed_seconds=round(time.time() - started, 1),
    )

    store = chaos.store()
    slow = store.get(slow_id)
    resent = [
        line
        for path in chaos.log_dir.glob("worker-*.log")
        for line in path.read_text(errors="replace").splitlines()
        if "re-sent" in line
    ]
    figures.update(
        slow_job_seconds=round(slow.completed_at - slow.started_at, 1),
        resends_logged=len(resent),
        slow_job_claims=slow.attempts,
    )
    print("chaos figures:", json.dumps(figures))
    (chaos.log_dir / "figures.json").write_text(json.dumps(figures, indent=2))

    assert len(ids) == JOBS + 1 == result.jobs
    assert result.stuck == [], f"stuck: {result.stuck[:5]}"
    assert result.duplicates == {}, f"done twice: {list(result.duplicates.items())[:5]}"
    assert result.unexpected_webhooks == [], result.unexpected_webhooks[:5]
    assert result.failed == {}, result.failed
    assert chaos.redis_restarts == 1 and figures["kills"] == KILLS

    # The slow job outlived its lease several times, was never sent again, and ran once.
    assert slow.completed_at - slow.started_at > 2 * chaos.settings.job_lease_seconds
    assert not [line for line in resent if slow_id in line], "a live worker's job is never re-sent"
    assert slow.attempts == 1 and log_lines(store, slow_id).count("loading image") == 1


@pytest.mark.timeout(300)
def test_a_copy_of_a_running_job_is_dropped_and_the_job_comes_back_when_its_worker_dies(
    moto_endpoint: str, tmp_path: Path
):
    """A copy of a job whose lease another worker holds is dropped (no copies piling up while it runs);
    once that worker is gone (its lease expired), the sweep sends the job again and it runs once."""
    stack = ChaosStack(tmp_path, moto_endpoint, overrides={"BIREFNET_JOB_LEASE_SECONDS": "6"})
    try:
        stack.start(workers=1, gateway=False, producer=False, webhooks=False)
        store = stack.store()
        settings = stack.settings
        rid = str(uuid.uuid4())
        spec = JobSpec(
            request_id=rid,
            variant=VARIANT,
            params=JobParams(),
            image_url=data_uri(small_png(1)),
            output_prefix=request_output_prefix(settings, rid),
        )
        store.create(spec)
        # Another worker runs it and keeps its lease alive (held here for the whole observation).
        taken = store.claim(rid, VARIANT, "elsewhere", lease_seconds=60, max_attempts=3, worker="other")
        assert taken.outcome == "claimed"
        send_job(make_celery(settings), spec)
        deadline, peak = time.time() + 10, 0
        while time.time() < deadline:
            peak = max(peak, messages_of(store.redis, rid, spec.queue))
            time.sleep(0.2)
        assert peak <= 1 and messages_of(store.redis, rid, spec.queue) == 0, "the copy was taken and dropped"
        assert store.status(rid) == "IN_PROGRESS" and log_lines(store, rid).count("loading image") == 0
        store.redis.zadd(keys.running(VARIANT), {rid: time.time() - 1}, xx=True)  # the other worker died
        wait_for(lambda: store.status(rid) == "COMPLETED", 60, "the job to be sent again and run")
        record = store.get(rid)
        assert record.ok and record.attempts == 2 and log_lines(store, rid).count("loading image") == 1
    finally:
        stack.close()


# --- the fixes the chaos runs called for, pinned down one by one ------------------------------------------
class _Task:
    """Stands in for a bound Celery task: records the countdown, or fails to publish like a broker that is
    down."""

    def __init__(self, publish_fails: bool = False):
        self.publish_fails, self.countdowns = publish_fails, []

    def retry(self, countdown: float, max_retries: None) -> None:
        from celery.exceptions import Reject, Retry

        self.countdowns.append(countdown)
        if self.publish_fails:
            raise Reject("Error 111 connecting to redis", requeue=False)  # what Task.retry raises then
        raise Retry(when=countdown)


def test_worker_retries_keep_the_message_when_redis_is_down():
    from celery.exceptions import Reject, Retry

    from worker import app as worker_app

    task = _Task()
    with pytest.raises(Retry):
        worker_app.retry_later(task, 30.0)
    assert task.countdowns == [30.0]
    with pytest.raises(Reject) as rejected:
        worker_app.retry_later(_Task(publish_fails=True), 1.0)
    assert rejected.value.requeue, "requeued, never dropped"


def test_a_completion_whose_webhook_task_is_lost_is_still_delivered_once(redis_server, receiver):
    from common.domain.signing import WebhookSigner, load_private_key
    from common.settings import Settings
    from common.state.jobs import JobStore
    from common.state.results import finish_job
    from common.state.webhooks import Handoff, WebhookSender
    from tests.helpers.gateway import signing_seed

    store = JobStore.from_url(f"redis://127.0.0.1:{redis_server.port}/0")
    store.redis.flushdb()
    settings = Settings(
        webhook_timeout=0.2,
        webhook_retry_base=0.1,
        fetch_allow_networks=("127.0.0.0/8",),
        fetch_allowed_ports=(0,),
    )
    rid = str(uuid.uuid4())
    spec = JobSpec(
        request_id=rid,
        variant=VARIANT,
        params=JobParams(),
        image_url="data:,x",
        output_prefix=f"results/requests/{rid}/",
        webhook_url=receiver.url,
    )
    store.create(spec)
    # Completed, then the deliverer that took the hand-off dies before attempting it.
    finish_job(settings=settings, store=store, objects=None, spec=spec, body={"image": None}, token="")
    handoff = Handoff.parse(store.redis.rpop(keys.WEBHOOK_READY))
    assert handoff is not None and handoff.request_id == rid
    assert store.status(rid) == "COMPLETED"
    sender = WebhookSender(settings, store, WebhookSigner([load_private_key(signing_seed())]))
    assert sender.claim_due() == [], "not due yet: the task sent at completion gets its chance first"
    # Due once an attempt made from the hand-off must have ended: 5 timeouts and 5 s, and a timeout more.
    due = wait_for(lambda: sender.claim_due(), 10, "the first attempt's booking to fall due")
    assert due == [(rid, 0)]
    assert sender.deliver(rid, 0).ok and store.redis.zscore(keys.WEBHOOK_DUE, f"{rid}|0") is None
    assert sender.deliver(rid, 0) is None, "a second copy of the task finds the attempt taken"
    time.sleep(0.5)
    assert sender.claim_due() == [] and [h.json()["request_id"] for h in receiver.received] == [rid]
