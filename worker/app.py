"""The GPU worker's Celery app: one `run_job` task over warm predictors.

`python -m worker` loads the models *before* Celery starts consuming (pool solo: the model lives in
the process that runs the jobs), writes the readiness file, and keeps a heartbeat in Redis that the
ops command reads. A watchdog (worker/watchdog.py) ends a worker whose inference thread is stuck; the
metrics port answers the probes: /healthz (liveness: the inference threads make progress) and /readyz
(models loaded and not stuck).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import NoReturn

from celery import Celery, Task
from celery.exceptions import Reject
from celery.signals import worker_ready

from common.adapters.queue import RUN_JOB, make_celery
from common.adapters.redis_conn import redis_client
from common.adapters.storage import ObjectStore
from common.domain.schemas import JobSpec
from common.observability.metrics import (
    model_loaded,
    patch_order_checked,
    register_gpu_collector,
    start_metrics_server,
)
from common.settings import RedisSettings, WorkerSettings
from common.state.jobs import JobStore
from common.state.ops_state import paused_variants, publish_heartbeat
from common.state.orphans import OrphanSweep, SweepTiming
from worker.engine import Predictor
from worker.packing import load_predictors
from worker.run_overrides import RunOverrides
from worker.runner import JobRunner
from worker.watchdog import Watchdog

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 10.0  # the sweep for lost jobs runs more often, on the same thread


class WorkerProcess:
    """What this process holds: warm predictors and the runner that uses them."""

    def __init__(
        self,
        settings: WorkerSettings,
        overrides: RunOverrides,
        on_loaded: Callable[[JobRunner], None] | None = None,
        limits_redis: RedisSettings | None = None,
    ) -> None:
        """`on_loaded(runner)` runs once the models are loaded, before any job is taken (a wrapper's
        instrumentation, e.g. a test harness's). `limits_redis`: where per-key limits live when
        that is not this worker's Redis (shard 0, with shards)."""
        self.settings = settings
        self.limits_redis = limits_redis
        self.overrides = overrides
        self.on_loaded = on_loaded
        self.runner: JobRunner | None = None
        self.watchdog: Watchdog | None = None
        self.name = f"{'+'.join(settings.worker_variants)}@{socket.gethostname()}:{os.getpid()}"

    def live(self) -> tuple[bool, str]:
        """Liveness: loading counts as alive (the startup probe covers it); then the watchdog's verdict."""
        return self.watchdog.healthy() if self.watchdog else (True, "loading models")

    def ready(self) -> tuple[bool, str]:
        if self.watchdog is None:
            return False, "loading models"
        return self.watchdog.healthy()

    def load(self, app: Celery) -> None:
        """Load the models and start the probes, the watchdog and the heartbeat; `app` sends follow-up
        tasks."""
        settings = self.settings
        # Early: the liveness probe uses it while the models load.
        start_metrics_server(
            settings.worker_metrics_port,
            "worker",
            {"/healthz": self.live, "/readyz": self.ready},
            host=settings.metrics_host,
        )
        register_gpu_collector()

        def ready(variant_id: str, predictor: Predictor, seconds: float) -> None:
            log.info("variant %s ready in %.1fs: %s", variant_id, seconds, predictor.weights_description)
            model_loaded(variant_id, seconds, predictor.untrained)
            if predictor.patch_order_report is not None:
                patch_order_checked(variant_id, predictor.patch_order_report.as_dict())

        predictors = load_predictors(settings, on_ready=ready)
        store = JobStore.from_settings(settings)
        limits_client = redis_client(self.limits_redis) if self.limits_redis is not None else store.redis
        self.runner = JobRunner(
            settings,
            store,
            ObjectStore(settings),
            app,
            predictors,
            self.name,
            overrides=self.overrides,
            limits=limits_client,
        )
        if self.on_loaded is not None:
            self.on_loaded(self.runner)
        self.runner.health.on_trip(lambda _reason: self._not_ready())
        limits = {variant: settings.time_limit(variant) for variant in predictors}
        self.watchdog = Watchdog(
            self.runner,
            limits,
            grace=settings.job_lease_seconds,
            drain_seconds=min(10.0, settings.job_lease_seconds / 2),
            interval=min(1.0, min(limits.values()) / 10),
        ).start()
        with open(settings.ready_file, "w") as handle:
            handle.write(json.dumps({"variants": list(predictors), "pid": os.getpid()}))
        threading.Thread(target=self._heartbeat, args=(app,), name="heartbeat", daemon=True).start()

    def _heartbeat(self, app: Celery) -> None:
        assert self.runner is not None
        settings = self.settings
        info = {
            "name": self.name,
            "variants": list(self.runner.predictors),
            "untrained": [v for v, p in self.runner.predictors.items() if p.untrained],
            "device": str(next(iter(self.runner.predictors.values())).device)
            if self.runner.predictors
            else "",
            "patch_order": {
                v: p.patch_order_report.as_dict() if p.patch_order_report else None
                for v, p in self.runner.predictors.items()
            },
            "started_at": time.time(),
        }
        timing = SweepTiming.from_lease(settings.job_lease_seconds)
        orphans = OrphanSweep(self.runner.store, app, timing)
        beat_at = 0.0
        while True:
            try:
                if time.monotonic() - beat_at >= HEARTBEAT_SECONDS:
                    publish_heartbeat(self.runner.store.redis, self.name, info)
                    beat_at = time.monotonic()
                for variant in self.runner.predictors:
                    orphans.resend(variant, settings.variants.get(variant).queue)
            except Exception:  # the heartbeat must never take the worker down
                log.warning("heartbeat to Redis failed", exc_info=True)
            time.sleep(timing.interval)

    def _not_ready(self) -> None:
        with contextlib.suppress(OSError):
            os.remove(self.settings.ready_file)

    def honour_pauses(self, consumer) -> None:
        """A worker starting while `ops pause` holds one of its variants leaves that queue alone."""
        try:
            paused = paused_variants(self.runner.store.redis) if self.runner else {}
        except Exception:
            log.warning("could not read pause flags; consuming every queue", exc_info=True)
            return
        for variant in self.settings.worker_variants:
            if variant in paused:
                log.warning(
                    "variant %s is paused (python -m ops resume %s); not consuming it", variant, variant
                )
                consumer.cancel_task_queue(self.settings.variants.get(variant).queue)


def retry_later(task: Task, countdown: float) -> NoReturn:
    """Hand the job back to the broker to run again after `countdown` seconds; always raises.

    The new message waits in a worker's memory until it is due (gone from Redis: should that worker die,
    the job's record brings it back, common/state/orphans.py). When the new message cannot be published
    (Redis down), Celery rejects the current one without requeueing: requeue it instead (and should that
    fail too, the record brings the job back).
    """
    try:
        raise task.retry(countdown=countdown, max_retries=None)  # Celery's idiom
    except Reject as exc:
        log.warning("could not queue the retry (%s); keeping the message", exc.reason)
        raise Reject(exc.reason, requeue=True) from None


def create_celery_app(settings: WorkerSettings, state: WorkerProcess) -> Celery:
    """The worker's Celery app: `run_job` over `state`'s runner, and the pause check at start-up."""
    app = make_celery(settings, name="birefnet-worker")
    worker_ready.connect(lambda sender, **_: state.honour_pauses(sender), weak=False)

    @app.task(name=RUN_JOB, bind=True, acks_late=True, max_retries=None)
    def run_job(task: Task, spec_data: dict) -> str:
        if state.runner is None:
            raise RuntimeError("models are not loaded: start workers with `python -m worker`")
        spec = JobSpec.model_validate(spec_data)
        try:
            outcome = state.runner.run(spec)
        except Exception:
            # An exception escaping the task would drop its message (acks_late rejects it); retry instead.
            log.exception("job %s: unexpected failure around the runner; retrying", spec.request_id)
            retry_later(task, 5.0)
        if outcome.kind == "handback" or (outcome.kind == "retry" and state.runner.health.tripped):
            # This worker is stuck and about to exit: put the message straight back for another worker (a
            # countdown retry would be held here, and lost with this worker).
            time.sleep(0.2)  # while it lasts, do not spin on messages it keeps being handed
            raise Reject(outcome.detail, requeue=True)
        # `defer`: another worker holds the lease. This copy is dropped: should that worker die, its lease
        # expires and the job's record brings the job back (common/state/orphans.py).
        if outcome.kind == "retry":
            retry_later(task, min(30.0, 2.0 * 2**task.request.retries))
        return outcome.kind

    return app
