"""Pushed job changes (gateway/push.py): waiters wake on every state change that goes through
JobStore, not otherwise, and cost Redis no command while they wait. Real redis-server."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from common.domain.schemas import JobSpec
from common.state.jobs import STATUS_READ, JobStore, status_read_call
from devstack.services import RedisServer
from gateway.push import JobEvents
from tests.helpers.specs import job_spec


def make_spec(variant: str = "general-light", priority: str = "normal") -> JobSpec:
    return job_spec(variant, priority=priority)


@pytest.fixture
def store(redis_server: RedisServer) -> JobStore:
    job_store = JobStore.from_url(f"redis://127.0.0.1:{redis_server.port}/0")
    job_store.redis.flushdb()
    return job_store


def commands(store: JobStore) -> int:
    return sum(int(v["calls"]) for v in store.redis.info("commandstats").values())


def publishes(store: JobStore) -> int:
    return int(store.redis.info("commandstats").get("cmdstat_publish", {}).get("calls", 0))


def mark_and_read(store: JobStore, request_id: str) -> str:
    """What a status stream does after subscribing: mark the record watched and read it, in one call."""
    fields, _, _ = store.redis.register_script(STATUS_READ)(**status_read_call(request_id, None, watch=True))
    return fields[0]


def test_waiters_wake_on_each_change_and_stay_silent_otherwise(store: JobStore, redis_server: RedisServer):
    async def scenario() -> None:
        client = aioredis.Redis.from_url(f"redis://127.0.0.1:{redis_server.port}/0", decode_responses=True)
        hub = JobEvents(client, recheck=60.0, fallback_poll=0.2)
        spec, other = make_spec(), make_spec()
        store.create(spec)
        store.create(other)
        try:
            async with (
                hub.watch(spec.request_id, spec.variant) as watch,
                hub.watch(other.request_id) as bystander,
            ):
                assert hub.subscribed
                assert mark_and_read(store, spec.request_id) == "IN_QUEUE"
                assert mark_and_read(store, other.request_id) == "IN_QUEUE"
                before = commands(store)
                assert not await watch.wait(1.0), "nothing changed: no wake-up"
                assert commands(store) - before <= 2, "waiting costs no Redis command (INFO itself counts)"

                steps = [
                    lambda: store.log(spec.request_id, "loading image"),
                    lambda: store.claim(
                        spec.request_id, spec.variant, "t", lease_seconds=5, max_attempts=3, worker="w"
                    ),
                    lambda: store.complete(spec.request_id, token="t", result={"ok": True}),
                ]
                for step in steps:
                    await asyncio.to_thread(step)
                    assert await watch.wait(10.0), "a change wakes the job's waiter"
                assert await bystander.wait(0.5) is False, "other jobs' changes do not wake it"

                # a job leaving the queue moves everyone behind it: queue watchers wake
                third = make_spec()
                await asyncio.to_thread(store.create, third)
                async with hub.watch(third.request_id, third.variant) as queued:
                    mark_and_read(store, third.request_id)
                    await asyncio.to_thread(store.cancel, other.request_id)
                    assert await queued.wait(10.0)
                    assert await bystander.wait(10.0), "its own cancel wakes the cancelled job's waiter"
        finally:
            await hub.close()
            await client.aclose()

    asyncio.run(scenario())


def test_a_lost_subscription_wakes_waiters_and_they_fall_back_to_polling(
    store: JobStore, redis_server: RedisServer
):
    async def scenario() -> None:
        client = aioredis.Redis.from_url(f"redis://127.0.0.1:{redis_server.port}/0", decode_responses=True)
        hub = JobEvents(client, recheck=60.0, fallback_poll=0.2)
        spec = make_spec()
        store.create(spec)
        try:
            async with hub.watch(spec.request_id) as watch:
                assert hub.subscribed
                mark_and_read(store, spec.request_id)
                store.redis.client_kill_filter(_type="pubsub")
                assert await watch.wait(10.0), "the broken subscription wakes the waiter to re-read"
                for _ in range(100):  # resubscribed (another wake-up), and pushes work again
                    if hub.subscribed:
                        break
                    await asyncio.sleep(0.1)
                assert hub.subscribed
                watch.changed.clear()
                await asyncio.to_thread(store.log, spec.request_id, "still heard")
                assert await watch.wait(10.0)
        finally:
            await hub.close()
            await client.aclose()

    asyncio.run(scenario())


def test_only_watched_jobs_publish_and_a_change_around_the_mark_is_never_lost(
    store: JobStore, redis_server: RedisServer
):
    """Mark, then read, then wait: a transition before the mark is in the read, one after it publishes."""

    async def scenario() -> None:
        client = aioredis.Redis.from_url(f"redis://127.0.0.1:{redis_server.port}/0", decode_responses=True)
        hub = JobEvents(client, recheck=60.0, fallback_poll=0.2)
        spec, ahead = make_spec(), make_spec()
        store.create(ahead)
        store.create(spec)
        try:
            before = publishes(store)
            store.log(spec.request_id, "queued line")
            store.claim(ahead.request_id, ahead.variant, "t", lease_seconds=5, max_attempts=3, worker="w")
            store.claim(spec.request_id, spec.variant, "t", lease_seconds=5, max_attempts=3, worker="w")
            assert publishes(store) == before, "nobody watches: the transitions publish nothing"
            async with hub.watch(spec.request_id, spec.variant) as watch:
                assert mark_and_read(store, spec.request_id) == "IN_PROGRESS", (
                    "the claim before is in the read"
                )
                await asyncio.to_thread(store.log, spec.request_id, "a line after the mark")
                assert await watch.wait(10.0), "a change after the mark publishes"
                await asyncio.to_thread(store.complete, spec.request_id, token="t", result={"ok": True})
                assert await watch.wait(10.0)
            before = publishes(store)
            store.complete(ahead.request_id, token="t", result={"ok": True})
            assert publishes(store) == before, "the unwatched job's completion publishes nothing"
        finally:
            await hub.close()
            await client.aclose()

    asyncio.run(scenario())


def test_a_sync_run_s_job_is_watched_from_its_creation(store: JobStore):
    spec = make_spec()
    store.create_queued(spec, watched=True)
    before = publishes(store)
    claimed = store.claim(
        spec.request_id, spec.variant, "t", lease_seconds=5, max_attempts=3, worker="w", sole_log_writer=True
    )
    assert claimed.watched
    store.log(spec.request_id, "a stage's line")
    store.complete(spec.request_id, token="t", result={})
    assert publishes(store) - before == 3, "claim, the stage's lines and the completion each publish"
