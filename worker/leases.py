"""A running job's lease, renewed in the background (`LeaseKeeper`), and whether this worker still takes jobs
(`WorkerHealth`): a stuck worker stops renewing, so other workers can take its jobs."""

from __future__ import annotations

import logging
import threading

import redis

from common.state.jobs import JobStore

log = logging.getLogger(__name__)


class WorkerHealth:
    """Whether this worker still takes jobs. Tripped once (by the watchdog, or by a job whose forward ran
    past its limit); from then on jobs are handed back, leases are no longer renewed, and the worker exits."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self._tripped = threading.Event()
        self._listeners: list = []

    @property
    def tripped(self) -> bool:
        return self._tripped.is_set()

    def on_trip(self, listener) -> None:
        self._listeners.append(listener)

    def trip(self, reason: str) -> None:
        if self._tripped.is_set():
            return
        self.reason = reason
        self._tripped.set()
        log.critical("worker is stuck and stops taking jobs: %s", reason)
        for listener in self._listeners:
            try:
                listener(reason)
            except Exception:
                log.exception("a watchdog listener failed")


class LeaseKeeper:
    """Renews the job's lease in the background while it runs, so no other worker takes it."""

    def __init__(
        self,
        store: JobStore,
        request_id: str,
        variant: str,
        token: str,
        lease_seconds: float,
        health: WorkerHealth | None = None,
    ):
        self.store, self.request_id, self.variant = store, request_id, variant
        self.token, self.lease_seconds = token, lease_seconds
        self.health = health
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{request_id[:8]}", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.lease_seconds / 3):
            if self.health is not None and self.health.tripped:
                return  # a stuck worker lets its leases run out, so other workers can take the jobs
            try:
                self.store.renew(self.request_id, self.variant, self.token, self.lease_seconds)
            except redis.RedisError:
                log.warning("could not renew the lease of %s", self.request_id)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
