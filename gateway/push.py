"""Push, not polling, for callers that wait: one Redis pub/sub subscription per gateway process.

`JobStore` publishes one notice per transition on `birefnet:events:job:<id>` of a job a caller watches: the
gateway marks the record `watched` (created so for a sync run; in a status stream's first read) after it
subscribed and before it reads, so a transition after the mark publishes and one before it is in the read;
the claim, the completion and a stage's lines of an unwatched job publish nothing. The message is the
job's variant when its queue's order changed too, and empty otherwise. The hub pattern-subscribes once and
wakes that job's local waiters and, for a variant, that queue's; they then read the record once. Queue
positions do not rely on these: a status stream re-reads a queued job every `gateway_queue_position_poll` s.
While the subscription is down waiters re-read every `gateway_push_fallback_poll` s (and all once it is
back); `gateway_push_recheck` is the safety net for a change that did not go through `JobStore`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import redis
import redis.asyncio as aioredis

from common.state import keys

log = logging.getLogger(__name__)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


class Watch:
    """One waiter: `changed` is set by the hub whenever its job or its queue may have changed."""

    def __init__(self, hub: JobEvents, request_id: str, variant: str) -> None:
        self.hub, self.request_id, self.variant = hub, request_id, variant
        self.changed = asyncio.Event()

    @property
    def recheck_after(self) -> float:
        """Seconds a waiter may go without re-reading: long while subscribed, short while not."""
        return self.hub.recheck if self.hub.subscribed else self.hub.fallback_poll

    async def wait(self, timeout: float | None = None) -> bool:
        """True once something changed (the flag is consumed); False after `timeout` (default:
        `recheck_after`). A cancelled wait leaves the flag as it was, so no change is lost."""
        limit = self.recheck_after if timeout is None else min(timeout, self.recheck_after)
        try:
            await asyncio.wait_for(self.changed.wait(), max(0.0, limit))
        except TimeoutError:
            return False
        self.changed.clear()
        return True


class JobEvents:
    def __init__(self, client: aioredis.Redis, *, recheck: float, fallback_poll: float) -> None:
        self.client = client
        self.recheck, self.fallback_poll = recheck, fallback_poll
        self.subscribed = False
        self._by_job: dict[str, set[Watch]] = {}
        self._by_queue: dict[str, set[Watch]] = {}
        self._task: asyncio.Task | None = None
        self._ready = asyncio.Event()

    @contextlib.asynccontextmanager
    async def watch(self, request_id: str, variant: str = "") -> AsyncIterator[Watch]:
        """Register before reading the record, so a change between the read and the wait is not lost."""
        self._start()
        watch = Watch(self, request_id, variant)
        self._by_job.setdefault(request_id, set()).add(watch)
        if variant:
            self._by_queue.setdefault(variant, set()).add(watch)
        try:
            with contextlib.suppress(TimeoutError):  # not subscribed yet: the fallback poll covers it
                await asyncio.wait_for(self._ready.wait(), 2.0)
            watch.changed.clear()  # the caller reads the record next: earlier wake-ups are covered by that
            yield watch
        finally:
            self._discard(self._by_job, request_id, watch)
            if variant:
                self._discard(self._by_queue, variant, watch)

    @staticmethod
    def _discard(index: dict[str, set[Watch]], key: str, watch: Watch) -> None:
        watchers = index.get(key)
        if watchers is not None:
            watchers.discard(watch)
            if not watchers:
                del index[key]

    def _start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._listen(), name="job-events")

    def _wake_all(self) -> None:
        for watchers in (*self._by_job.values(), *self._by_queue.values()):
            for watch in watchers:
                watch.changed.set()

    def _dispatch(self, channel: str | bytes, data: str | bytes) -> None:
        """A job's notice wakes its watchers and, when it names a variant, that queue's watchers."""
        kind, _, name = _text(channel)[len(keys.EVENTS_PREFIX) :].partition(":")
        woken = [self._by_job.get(name, ())] if kind == "job" else []
        queue = _text(data) if kind == "job" else ""
        if queue:
            woken.append(self._by_queue.get(queue, ()))
        for watchers in woken:
            for watch in watchers:
                watch.changed.set()

    async def _listen(self) -> None:
        delay = 0.1
        while True:
            pubsub = self.client.pubsub()
            try:
                await pubsub.psubscribe(keys.EVENTS_PATTERN)
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=False, timeout=None)
                    if message is None:
                        continue
                    if message["type"] == "psubscribe":
                        self.subscribed, delay = True, 0.1
                        self._ready.set()
                        self._wake_all()  # anything published while we were not subscribed
                    elif message["type"] == "pmessage":
                        self._dispatch(message["channel"], message["data"])
            except asyncio.CancelledError:
                raise
            except (redis.RedisError, OSError) as exc:
                if self.subscribed:
                    log.warning(
                        "job event subscription lost (%s); waiters re-read every %.1fs until it is back",
                        exc,
                        self.fallback_poll,
                    )
                self.subscribed = False
                self._ready.set()  # waiters run on the fallback poll meanwhile
                self._wake_all()
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(delay)
            delay = min(5.0, delay * 2)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
