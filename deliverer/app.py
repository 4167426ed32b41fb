"""The webhook deliverer: takes attempts straight from Redis, no Celery and no torch.

A job's completion books its first attempt in the due schedule and hands it, with what the attempt posts,
to the ready list in the same script (common/state/jobs.py). A deliverer blocks on the ready list (one BRPOP
per webhook), popping only while one of its `concurrency` delivery threads is free, and attempts what it
pops; the outcomes of the attempts that ended since its last pop go in the same round trip as its next one
(an `OutcomeOutbox`), so a webhook costs the deliverer one round trip. A pump thread moves bookings that
fall due (retries, and first attempts whose deliverer died after popping them) back onto the ready list. An
attempt's booking goes only with its outcome's write, so every webhook is attempted at least once whatever
process dies when; a copy the pump hands out takes the attempt's lock (`webhook_try`), so it does not post
while another copy is under way (common/state/webhooks.py).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import redis

from common.observability.metrics import count_webhook_delivery
from common.settings import DelivererSettings
from common.state import keys
from common.state.jobs import JobStore
from common.state.webhooks import READY_WAIT, Handoff, Outcome, OutcomeOutbox, WebhookSender

log = logging.getLogger(__name__)


class Deliverer:
    def __init__(
        self, settings: DelivererSettings, store: JobStore, sender: WebhookSender, concurrency: int = 4
    ):
        self.settings, self.store, self.sender = settings, store, sender
        self.outbox = sender.outbox or OutcomeOutbox()  # empty unless the sender leaves its outcomes here
        self.concurrency = max(1, concurrency)
        self.pump_interval = max(0.05, min(1.0, settings.webhook_retry_base / 4))

    def run(self, stop: threading.Event) -> None:
        """Deliver until `stop` is set (attempts under way finish first)."""
        pump = threading.Thread(target=self._pump, args=(stop,), name="webhook-pump", daemon=True)
        pump.start()
        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="webhook") as pool:
            self._pop_ready(stop, pool)
        self._write_last_outcomes()
        pump.join(timeout=self.pump_interval + 1)

    def _pop_ready(self, stop: threading.Event, pool: ThreadPoolExecutor) -> None:
        free = threading.Semaphore(self.concurrency)  # pop only what a thread can attempt at once
        delay = 0.1
        while not stop.is_set():
            if not free.acquire(timeout=READY_WAIT):
                continue
            try:
                popped = self.write_outcomes_and_pop()
                delay = 0.1
            except (redis.RedisError, OSError):
                free.release()
                log.warning("webhook ready list unreachable; retrying in %.1fs", delay, exc_info=True)
                stop.wait(delay)
                delay = min(5.0, delay * 2)
                continue
            if popped is None:
                free.release()
                continue
            pool.submit(self.attempt, str(popped[1])).add_done_callback(lambda _: free.release())

    def write_outcomes_and_pop(self) -> tuple[str, str] | None:
        """One round trip: the outcomes waiting in the outbox, then a BRPOP on the ready list."""
        outcomes = self.outbox.take()
        pipe = self.store.redis.pipeline(transaction=False)
        self.sender.write_outcomes(pipe, outcomes)
        pipe.brpop([keys.WEBHOOK_READY], timeout=READY_WAIT)
        try:
            replies = pipe.execute(raise_on_error=False)
        except BaseException:
            self.outbox.put_back(outcomes)
            raise
        self._check_outcomes(outcomes, replies[:-1])
        if isinstance(replies[-1], Exception):
            raise replies[-1]
        return replies[-1]

    def _check_outcomes(self, outcomes: list[Outcome], replies: list) -> None:
        failed = [reply for reply in replies if isinstance(reply, Exception)]
        if failed:  # a command refused (not a lost connection): retrying would not help; the bookings stay
            log.error("outcomes of %d webhook attempts not recorded: %s", len(outcomes), failed[0])

    def _write_last_outcomes(self) -> None:
        """The outcomes of the attempts that ended after the last pop, once no pop follows."""
        outcomes = self.outbox.take()
        if not outcomes:
            return
        pipe = self.store.redis.pipeline(transaction=False)
        self.sender.write_outcomes(pipe, outcomes)
        try:
            self._check_outcomes(outcomes, pipe.execute(raise_on_error=False))
        except (redis.RedisError, OSError):  # the bookings stay: the attempts are made again when due
            log.warning("outcomes of %d webhook attempts not recorded at stop", len(outcomes), exc_info=True)

    def attempt(self, entry: str) -> None:
        """Attempt a ready-list entry: a completion's hand-off, or a booking ("<request id>|<attempt>")."""
        request_id, attempt = "?", 0
        try:
            handoff = Handoff.parse(entry)
            if handoff is not None:
                request_id, attempt = handoff.request_id, handoff.attempt
                result = self.sender.deliver_handed(handoff)
            else:
                rid, _, number = entry.rpartition("|")
                request_id, attempt = rid, int(number)
                result = self.sender.deliver(request_id, attempt)
        except Exception:  # the booking stays behind: the pump hands it out again when it falls due
            log.warning("webhook for %s (attempt %d) failed to run", request_id, attempt, exc_info=True)
            return
        if result is None:
            return
        if not result.ok:
            log.warning("webhook for %s failed (attempt %d): %s", request_id, attempt, result.error)
        count_webhook_delivery(result.ok, attempt, self.settings.webhook_max_retries)

    def _pump(self, stop: threading.Event) -> None:
        while not stop.wait(self.pump_interval):
            try:
                due = self.sender.claim_due()
                if due:
                    self.store.redis.lpush(
                        keys.WEBHOOK_READY, *[keys.webhook_booking(rid, n) for rid, n in due]
                    )
            except Exception:  # Redis hiccups must not end the pump; the schedule is still in Redis
                log.warning("webhook retry pump failed; trying again", exc_info=True)
                time.sleep(self.pump_interval)
