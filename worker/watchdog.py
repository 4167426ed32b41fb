"""The worker's watchdog: a worker that is alive but stuck stops taking jobs, gives them back, and exits.

Python cannot stop a thread, so a forward that never returns cannot be cancelled; what can be done is to
notice it and let the process go. A thread separate from Celery's and from the inference threads checks
every second or so:

- each variant's inference thread: a forward running longer than that variant's run-time limit;
- each running job: still running `grace` seconds after its own deadline (stuck outside the forward, e.g.
  in an upload that ignores its timeouts).

Either trips the worker's `WorkerHealth` (a job whose forward outlives its own limit trips it at once, see
`JobRunner._timed_out`). Tripping ends the jobs of the stuck forward (an attempt that counts), hands every
other job back to the queue with its attempt refunded, stops renewing leases, makes the health endpoints
answer 503 and removes the readiness file; once the job threads have given their jobs back (or after
`drain_seconds`), the process exits with EXIT_STUCK so its supervisor (Kubernetes, compose `restart`)
starts a fresh one.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

from worker.runner import JobRunner

log = logging.getLogger(__name__)

EXIT_STUCK = 70  # EX_SOFTWARE: "internal software error"; supervisors restart on any non-zero exit


class Watchdog:
    def __init__(
        self,
        runner: JobRunner,
        limits: dict[str, float],
        *,
        grace: float,
        drain_seconds: float,
        interval: float = 1.0,
        exit_process: Callable[[int], None] = os._exit,
        before_exit: Callable[[], None] | None = None,
    ):
        self.runner = runner
        self.limits = limits  # variant -> run-time limit (s)
        self.grace = grace
        self.drain_seconds = drain_seconds
        self.interval = interval
        self._exit = exit_process
        self._before_exit = before_exit
        self._thread = threading.Thread(target=self._loop, name="watchdog", daemon=True)

    def start(self) -> Watchdog:
        self._thread.start()
        return self

    def stuck_reason(self) -> str | None:
        """Why the worker is stuck now, or None while every thread makes progress."""
        for variant, batcher in self.runner.batchers.items():
            limit = self.limits[variant]
            busy = batcher.busy_for()
            if busy > limit:
                return (
                    f"the {variant} inference thread has been in one forward for {busy:.0f}s, past the "
                    f"{limit:.0f}s run-time limit"
                )
            if not batcher.alive():
                return f"the {variant} inference thread has died"
        now = time.monotonic()
        for request_id, deadline in self.runner.running_jobs().items():
            if now > deadline + self.grace:
                return f"job {request_id} is still running {now - deadline:.0f}s past its run-time limit"
        return None

    def healthy(self) -> tuple[bool, str]:
        """For the liveness endpoint: the inference threads' state, not just that this thread answers."""
        if self.runner.health.tripped:
            return False, f"stuck: {self.runner.health.reason}"
        if not self._thread.is_alive():
            return False, "the watchdog thread is not running"
        reason = self.stuck_reason()
        return (False, reason) if reason else (True, "ok")

    def _loop(self) -> None:
        health = self.runner.health
        while not health.tripped:
            time.sleep(self.interval)
            reason = self.stuck_reason()
            if reason:
                health.trip(reason)
        self._drain_and_exit()

    def _drain_and_exit(self) -> None:
        """Give the job threads a moment to hand their jobs back, then go."""
        deadline = time.monotonic() + self.drain_seconds
        while self.runner.running_jobs() and time.monotonic() < deadline:
            time.sleep(0.1)
        left = list(self.runner.running_jobs())
        time.sleep(min(1.0, self.drain_seconds))  # the Celery side puts the messages back
        log.critical(
            "exiting (code %d) so the supervisor starts a fresh worker: %s%s",
            EXIT_STUCK,
            self.runner.health.reason,
            f"; leases of {left} are no longer renewed and run out" if left else "",
        )
        if self._before_exit is not None:
            self._before_exit()
        for handler in logging.getLogger().handlers:
            handler.flush()
        self._exit(EXIT_STUCK)
