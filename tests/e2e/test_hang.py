"""Nothing hangs: a forward that never returns ends its job's attempt at the run-time limit, the job goes to
another worker (or, hung on every attempt, ends with fal's 504 `request_timeout` and is dead-lettered), the
stuck worker reports unhealthy, hands its other jobs back and exits, and a supervisor replaces it.

Real processes: redis-server, moto, `python -m worker` processes (nano model, recipe weights) with the
test-only forward hook (tests/forward_hook.py) making chosen forwards hang, whatever the CPU's speed. A
thread plays the supervisor (compose `restart`, a Kubernetes Deployment): it starts a worker for each that
exits.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

from common.adapters.queue import make_celery, send_job
from common.adapters.storage import request_output_prefix
from common.domain.schemas import JobParams, JobSpec
from common.state import keys
from devstack.loopback import VARIANT
from devstack.services import free_port
from tests.forward_hook import Rule, hook_setting
from tests.helpers.audit import log_lines
from tests.helpers.faults import ChaosStack
from tests.helpers.images import data_uri, marker_png, small_png
from tests.helpers.stack import TEST_VARIANTS, wait_for
from worker.watchdog import EXIT_STUCK

LIMIT = 5.0  # general-light's run-time limit here (a per-variant override; the global default stays)
HANG_ONCE, HANG_ALWAYS = 61, 62  # image widths the hook picks (no other test image has them)


class Supervisor:
    """Starts a replacement for every worker that exits (records each exit code) and polls every live
    worker's /healthz, as a liveness probe would."""

    def __init__(self, stack: ChaosStack):
        self.stack = stack
        self.ports: dict[str, int] = {}
        self.exits: dict[str, int] = {}
        self.probes: dict[str, set[int]] = {}  # worker -> HTTP statuses its /healthz answered
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._restart, daemon=True),
            threading.Thread(target=self._probe, daemon=True),
        ]

    def start_worker(self) -> str:
        port = free_port()
        name = self.stack.start_worker(wait=False, extra_env={"BIREFNET_WORKER_METRICS_PORT": str(port)})
        self.ports[name] = port
        return name

    def __enter__(self) -> Supervisor:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)

    def _restart(self) -> None:
        while not self._stop.wait(0.2):
            for name, proc in list(self.stack.workers.items()):
                if name not in self.exits and proc.poll() is not None:
                    self.exits[name] = proc.returncode
                    self.start_worker()

    def _probe(self) -> None:
        with httpx.Client(timeout=0.5) as client:
            while not self._stop.wait(0.05):
                for name, port in list(self.ports.items()):
                    if name in self.exits:
                        continue
                    try:
                        status = client.get(f"http://127.0.0.1:{port}/healthz").status_code
                    except httpx.HTTPError:
                        continue
                    self.probes.setdefault(name, set()).add(status)


def submit(stack: ChaosStack, image: bytes) -> str:
    rid = str(uuid.uuid4())
    spec = JobSpec(
        request_id=rid,
        variant=VARIANT,
        params=JobParams(),
        image_url=data_uri(image),
        output_prefix=request_output_prefix(stack.settings, rid),
    )
    stack.store().create(spec)
    send_job(make_celery(stack.settings), spec)
    return rid


def stuck_workers(stack: ChaosStack) -> list[str]:
    return [
        name
        for name in stack.workers
        if "worker is stuck and stops taking jobs"
        in (stack.log_dir / f"{name}.log").read_text(errors="replace")
    ]


@pytest.mark.timeout(400)
def test_hung_forwards_end_at_the_limit_and_the_stuck_worker_is_replaced(moto_endpoint: str, tmp_path: Path):
    variants = {**TEST_VARIANTS, VARIANT: {**TEST_VARIANTS[VARIANT], "time_limit": LIMIT}}
    stack = ChaosStack(
        tmp_path,
        moto_endpoint,
        overrides={
            "BIREFNET_VARIANT_OVERRIDES": json.dumps(variants),
            "BIREFNET_MAX_JOB_ATTEMPTS": "2",
            # a stuck worker also holds jobs waiting behind the hung forward
            "BIREFNET_WORKER_CONCURRENCY": "2",
            "BIREFNET_TEST_FORWARD_HOOK": hook_setting(
                tmp_path / "hook", Rule(HANG_ONCE, None, times=1), Rule(HANG_ALWAYS, None)
            ),
        },
    )
    try:
        stack.start(workers=0, gateway=False, producer=False, webhooks=False)
        assert stack.settings.job_time_limit == 300 and stack.settings.time_limit(VARIANT) == LIMIT
        store = stack.store()
        with Supervisor(stack) as supervisor:
            first = [supervisor.start_worker() for _ in range(2)]
            for name in first:
                stack.wait_ready(name)

            # A forward that hangs once, one that hangs on every attempt, and normal jobs beside them.
            hung = submit(stack, marker_png(HANG_ONCE))
            always = submit(stack, marker_png(HANG_ALWAYS))
            wait_for(
                lambda: store.status(hung) == store.status(always) == "IN_PROGRESS", 30, "the hangs to start"
            )
            normal = [submit(stack, small_png(n)) for n in range(6)]

            # The hung-once job ran past its limit and finished on another worker. (If it shared its forward
            # with the always-hanging job, that run was not charged and it ran alone afterwards.)
            wait_for(lambda: store.status(hung) == "COMPLETED", 240, "the hung job to finish elsewhere")
            record = store.get(hung)
            assert record.ok, record.error
            lines = log_lines(store, hung)
            assert lines.count("loading image") >= 2 and record.attempts <= 2
            assert any("run-time limit of 5s" in line for line in lines), lines

            # The always-hanging job: each of its 2 attempts ended at the limit, then it ended with fal's
            # timeout error (flat shape, 504 request_timeout) and was dead-lettered.
            wait_for(lambda: store.status(always) == "COMPLETED", 240, "the always-hanging job to end")
            record = store.get(always)
            assert (record.error_type, record.result_code) == ("request_timeout", 504)
            assert record.result == {"detail": record.error, "error_type": "request_timeout"}
            assert "run-time limit" in record.error and "dead-letter" in record.error
            assert record.attempts == 3, "two charged runs, then the claim that ended it"
            assert log_lines(store, always).count("loading image") >= 2
            assert store.redis.zscore(keys.DEADLETTER, always) is not None

            # Nothing else was held past its own limit: each normal job finished within one run and none
            # counted an attempt (one handed back by a stuck worker had its attempt refunded).
            for rid in normal:
                wait_for(lambda rid=rid: store.status(rid) == "COMPLETED", 120, "the normal jobs")
                job = store.get(rid)
                assert job.ok and job.attempts == 1 and job.completed_at - job.started_at < LIMIT, job
                assert sum(line.startswith("done in ") for line in log_lines(store, rid)) == 1
            handed_back = sum(
                any(line.startswith("handed to another worker") for line in log_lines(store, rid))
                for rid in normal
            )

            # Every stuck worker said so on /healthz (after answering 200 while healthy), withdrew its
            # readiness and exited with EXIT_STUCK; the supervisor replaced it; no other worker exited.
            stuck = stuck_workers(stack)
            assert len(stuck) >= 2, stuck  # the always-hanging job alone hung two workers
            wait_for(lambda: set(stuck) <= set(supervisor.exits), 60, "the stuck workers to exit")
            assert supervisor.exits == {name: EXIT_STUCK for name in stuck}
            for name in stuck:
                assert {200, 503} <= supervisor.probes.get(name, set()), (name, supervisor.probes.get(name))
                assert not (tmp_path / f"{name}.ready").exists(), "readiness withdrawn"
            after = submit(stack, small_png(99))
            wait_for(lambda: store.status(after) == "COMPLETED", 120, "a job on the replacement workers")
            assert store.get(after).ok
        print(
            "hang figures:",
            json.dumps(
                {
                    "exits": supervisor.exits,
                    "limit": LIMIT,
                    "handed_back": handed_back,
                    "elapsed": round(time.time() - record.created_at, 1),
                }
            ),
        )
    finally:
        stack.close()


def test_the_forward_hook_cannot_be_enabled_with_trained_weights(tmp_path: Path):
    from tests.helpers.hooked_worker import HooksForTests, load_forward_hook

    setting = hook_setting(tmp_path, Rule(HANG_ONCE, 0.1, times=1))
    assert load_forward_hook(HooksForTests(), {VARIANT: False}) is None, "off unless set"
    with pytest.raises(RuntimeError, match="untrained recipe weights"):
        load_forward_hook(HooksForTests(forward_hook=setting), {VARIANT: False})
    with pytest.raises(RuntimeError, match="untrained recipe weights"):
        load_forward_hook(HooksForTests(forward_hook=setting), {VARIANT: True, "general-heavy": False})
    hook = load_forward_hook(HooksForTests(forward_hook=setting), {VARIANT: True})
    assert hook is not None and "width 61" in hook.describe()
    from PIL import Image

    started = time.monotonic()
    hook([Image.new("RGB", (HANG_ONCE, 8))])  # the one allowed use: 0.1 s
    hook([Image.new("RGB", (HANG_ONCE, 8))])  # used up: at once
    assert (tmp_path / f"forward-hook-{HANG_ONCE}-0").exists() and time.monotonic() - started >= 0.1
