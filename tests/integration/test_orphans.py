"""A job whose broker message is gone is sent again; one that still has its message, or whose worker still
holds its lease, is not."""

from __future__ import annotations

import time

from common.adapters.queue import make_celery, send_job
from common.domain.schemas import JobSpec
from common.settings import Settings
from common.state import keys
from common.state.jobs import JobStore
from common.state.orphans import OrphanSweep, SweepTiming
from devstack.services import RedisServer
from tests.helpers.specs import job_spec

QUEUE = "birefnet.general-light"
TIMING = SweepTiming.from_lease(30)


def _setup(redis_server: RedisServer):
    url = f"redis://127.0.0.1:{redis_server.port}/0"
    store = JobStore.from_url(url)
    store.redis.flushdb()
    return store, make_celery(Settings(redis_url=url))


def _job(store: JobStore, created_at: float) -> JobSpec:
    spec = job_spec(created_at=created_at)
    store.create(spec)
    return spec


def _sweep(store: JobStore, celery, *, again: bool = True) -> list[str]:
    """A sweep by a worker that just started; `again`: once the last sweep's locks have expired."""
    if again:
        store.redis.delete(keys.orphan_scan("general-light"), keys.orphan_queued_scan("general-light"))
    return OrphanSweep(store, celery, TIMING).resend("general-light", QUEUE)


def _queued_ids(store: JobStore) -> list[str]:
    from common.adapters import broker

    return [broker.decode(raw).job_request_id for raw in store.redis.lrange(QUEUE, 0, -1)]


def test_lost_message_of_a_queued_job_is_resent_once(redis_server: RedisServer):
    store, celery = _setup(redis_server)
    old = time.time() - 600
    lost, queued = _job(store, old), _job(store, old)
    _job(store, time.time())  # fresh: its message may be in a worker's hands still
    send_job(celery, queued)

    assert _sweep(store, celery) == [lost.request_id], "only the old job without a message is sent again"
    assert store.redis.llen(QUEUE) == 2
    assert _sweep(store, celery, again=False) == [], "one look per period for all workers"
    assert _sweep(store, celery) == [], "its message is in the queue now"


def _running(store: JobStore, spec: JobSpec, lapses: float) -> None:
    claim = store.claim(spec.request_id, spec.variant, "t", lease_seconds=30, max_attempts=3, worker="w")
    assert claim.outcome == "claimed"
    store.redis.zadd(keys.running(spec.variant), {spec.request_id: lapses}, xx=True)  # its lease lapses then


def test_a_dead_workers_running_job_is_resent_and_claimed_again(redis_server: RedisServer):
    store, celery = _setup(redis_server)
    now = time.time()
    dead, alive, young = _job(store, now - 100), _job(store, now - 100), _job(store, now - 5)
    _running(store, dead, now - 10)  # its worker died a lease ago
    _running(store, alive, now + 25)  # a long job whose worker renews its lease
    _running(store, young, now + 1)  # its worker may have died, but its lease has not lapsed yet

    assert _sweep(store, celery) == [dead.request_id]
    assert _queued_ids(store) == [dead.request_id]
    assert _sweep(store, celery) == [], "its copy waits in the queue"
    store.redis.delete(QUEUE)  # a worker popped the copy and holds it, unstarted, behind another job
    assert _sweep(store, celery) == [], "the copy gets a lease's time to be claimed before another is sent"

    outcome = store.claim(dead.request_id, dead.variant, "t2", lease_seconds=30, max_attempts=3, worker="w2")
    assert outcome.outcome == "claimed" and store.get(dead.request_id).attempts == 2, "the attempt counts"


def test_a_job_that_kills_every_worker_is_dead_lettered(redis_server: RedisServer):
    store, celery = _setup(redis_server)
    spec = _job(store, time.time() - 100)
    for attempt in range(3):
        token = f"t{attempt}"
        claim = store.claim(
            spec.request_id, spec.variant, token, lease_seconds=30, max_attempts=3, worker="w"
        )
        assert claim.outcome == "claimed"
        store.redis.zadd(keys.running(spec.variant), {spec.request_id: time.time() - 1})  # the worker died
        assert _sweep(store, celery) == [spec.request_id]
        store.redis.delete(QUEUE)
    outcome = store.claim(spec.request_id, spec.variant, "t3", lease_seconds=30, max_attempts=3, worker="w")
    assert outcome.outcome == "exhausted", "the runner then dead-letters it"
