"""The webhook deliverer's loop against a real redis-server and a real receiver: what it costs Redis per
webhook, and that no outcome is left unwritten when it stops."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from common.domain.signing import WebhookSigner, load_private_key
from common.settings import Settings
from common.state import keys
from common.state.jobs import JobStore
from common.state.webhooks import OutcomeOutbox, WebhookSender, first_attempt_due, list_attempts
from deliverer.app import Deliverer
from devstack.builder import signing_seed
from devstack.receiver import WebhookReceiver
from devstack.services import RedisServer
from tests.helpers.specs import job_spec


@pytest.fixture
def redis_alone() -> Iterator[RedisServer]:
    """A redis-server of this test's own: its read events are this test's deliverer's and ours."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    hooks = WebhookReceiver().start()
    yield hooks
    hooks.stop()


def deliverer_for(server: RedisServer, concurrency: int) -> Deliverer:
    settings = Settings(
        redis_url=server.url,
        webhook_retry_base=60,  # the pump looks for due bookings once a second
        webhook_timeout=5,
        fetch_allow_networks=("127.0.0.0/8",),
        fetch_allowed_ports=(0,),
    )
    store = JobStore.from_settings(settings)
    sender = WebhookSender(
        settings, store, WebhookSigner([load_private_key(signing_seed())]), OutcomeOutbox()
    )
    return Deliverer(settings, store, sender, concurrency)


def complete_with_webhook(store: JobStore, url: str, due: float) -> str:
    """A job run and completed as a worker does it: the completion hands its webhook to the deliverers."""
    spec = job_spec(webhook_url=url)
    store.create(spec)
    store.claim(spec.request_id, spec.variant, "t", lease_seconds=30, max_attempts=3, worker="w")
    store.complete(spec.request_id, token="t", result={"image": {"url": "https://x/y.png"}}, webhook_due=due)
    return spec.request_id


def reads(store: JobStore) -> int:
    """Requests Redis has read from its clients so far: its round trips."""
    return int(store.redis.info("stats")["total_reads_processed"])


def test_a_webhook_costs_the_deliverer_one_round_trip(redis_alone, receiver):
    deliverer = deliverer_for(redis_alone, concurrency=1)
    store = deliverer.store
    jobs = 20
    ids = [
        complete_with_webhook(store, receiver.url, first_attempt_due(deliverer.settings)) for _ in range(jobs)
    ]
    stop = threading.Event()
    before, started = reads(store), time.monotonic()
    runner = threading.Thread(target=deliverer.run, args=(stop,))
    runner.start()
    try:
        receiver.wait(jobs, timeout=30)
    finally:
        stop.set()
        runner.join(timeout=10)
    seconds, used = time.monotonic() - started, reads(store) - before - 1  # less our INFO before
    assert {item.json()["request_id"] for item in receiver.received} == set(ids)
    for rid in ids:  # every outcome written, every booking taken back
        assert [a["ok"] for a in list_attempts(store, rid)] == [True], rid
        assert store.redis.zscore(keys.WEBHOOK_DUE, keys.webhook_booking(rid, 0)) is None, rid
    # Per webhook one round trip: its outcome goes with the pop of the next. Besides: the connection's setup
    # (a few), the pump's look at the schedule (once a second, its script loaded once), the pops that time
    # out waiting (one per 2 s) and the last outcome's write at stop. An outcome written in a round trip of
    # its own would make it 2 per webhook.
    overhead = 6 + 2 * int(seconds + 1)
    assert used <= jobs + overhead, f"{used} round trips for {jobs} webhooks in {seconds:.1f} s"


def test_a_stopped_deliverer_writes_the_outcomes_it_holds(redis_alone, receiver):
    deliverer = deliverer_for(redis_alone, concurrency=2)  # a thread free: it pops again at once
    store = deliverer.store
    stop = threading.Event()
    runner = threading.Thread(target=deliverer.run, args=(stop,))
    runner.start()
    try:
        rid = complete_with_webhook(store, receiver.url, first_attempt_due(deliverer.settings))
        receiver.wait(1, timeout=10)
    finally:
        stop.set()  # while its next pop blocks, with the outcome in its outbox
        runner.join(timeout=10)
    assert not runner.is_alive()
    record = store.get(rid)
    assert record is not None and record.webhook_delivered
    assert store.redis.zscore(keys.WEBHOOK_DUE, keys.webhook_booking(rid, 0)) is None, (
        "the booking taken back"
    )
