"""fal-style webhook payloads, signed delivery through the SSRF guard, and retries (docs/api.md#webhooks).

Deliveries run in the deliverer (deliverer/), so GPU workers never wait on HTTP; no Celery task carries
them. Every attempt is booked in the due zset: the first by the completion itself (which also hands it to
the deliverers on the ready list), each retry by the failed attempt before it. A booking stays until its
attempt's outcome is recorded, and the deliverer's pump hands out bookings as they fall due, so a
deliverer dying after taking an attempt, or mid-attempt, leaves the attempt behind. Each attempt's outcome
is a field of the job's record, written with the delivered (or next attempt) mark.

The completion's hand-off (`Handoff`) carries what attempt 0 needs, so its deliverer reads nothing and posts
at once. Its booking falls due only after the longest an attempt can take (`attempt_seconds`) and a
timeout more, so a deliverer that takes the hand-off in time finishes before the pump could hand the same
attempt out again: it takes no lock. A hand-off taken later, and every booking the pump hands out, reads
the record and takes the attempt's lock (`webhook_try`), so no second copy posts while one is under way.

A sender given an `OutcomeOutbox` (the deliverer's) leaves each outcome there instead of writing it: the
deliverer writes it in the same round trip as its next pop from the ready list, at most `READY_WAIT` later.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import cast

import httpcore
from redis.client import Pipeline
from redis.typing import EncodableT, FieldT

from common.adapters.netguard import NetPolicy, guarded_pool, parse_http_url
from common.domain.errors import JobError
from common.domain.schemas import JobSpec
from common.domain.signing import WebhookSigner
from common.domain.status import Status
from common.settings import DelivererSettings, FetchSettings, WebhookTimingSettings
from common.state import keys
from common.state.jobs import JobRecord, JobStore, webhook_fields


@dataclass(frozen=True)
class Delivery:
    """What an attempt needs of a job's record, read without its spec (`delivery_state`)."""

    request_id: str
    status: Status
    result: dict | None
    result_code: int | None
    error: str | None
    webhook_url: str | None
    user_id: str  # X-Fal-Webhook-User-Id
    delivered: bool  # an attempt got a 2xx
    next_attempt: int  # the attempts before this one failed

    @property
    def ok(self) -> bool:
        return self.status == Status.COMPLETED and self.error is None


_DELIVERY_FIELDS = (
    "status",
    "result",
    "result_code",
    "error",
    "webhook_url",
    "webhook_user",
    "webhook_delivered",
    "webhook_next",
)


def delivery_state(store: JobStore, request_id: str) -> Delivery | None:
    """The record's fields an attempt needs, in one HMGET (the webhook's URL and user are fields of their
    own since creation, so the spec stays in Redis); None without a record."""
    key = keys.job(request_id)
    values = cast(list[str | None], store.redis.hmget(key, _DELIVERY_FIELDS))  # a decoding client
    raw = dict(zip(_DELIVERY_FIELDS, values, strict=True))
    if raw["status"] is None:
        return None
    if raw["webhook_url"] is None:  # a record written before those fields existed: its spec has them
        spec = cast(str | None, store.redis.hget(key, "spec"))
        raw.update(webhook_fields(JobSpec.model_validate_json(spec)) if spec else {})
    return Delivery(
        request_id=request_id,
        status=Status(raw["status"]),
        result=json.loads(raw["result"]) if raw["result"] else None,
        result_code=int(raw["result_code"]) if raw["result_code"] else None,
        error=raw["error"] or None,
        webhook_url=raw["webhook_url"] or None,
        user_id=raw["webhook_user"] or "system",
        delivered=raw["webhook_delivered"] == "1",
        next_attempt=int(raw["webhook_next"] or 0),
    )


def error_summary(record: JobRecord | Delivery) -> str | None:
    """fal's `error` string: "Invalid status code: <code>" for 4xx, the message otherwise."""
    if record.ok:
        return None
    code = record.result_code or 500
    return f"Invalid status code: {code}" if 400 <= code < 500 else (record.error or "Internal error")


def build_payload(record: JobRecord | Delivery) -> dict:
    return {
        "request_id": record.request_id,
        "gateway_request_id": record.request_id,
        "status": "OK" if record.ok else "ERROR",
        "payload": record.result,
        "error": error_summary(record),
    }


def encode_payload(payload: dict) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


@dataclass
class Attempt:
    attempt: int
    at: float
    status_code: int | None
    ok: bool
    error: str | None = None
    final: bool = False  # no retry follows: the URL is refused by the network policy, or retries ran out


def attempt_fields(attempt: Attempt) -> dict[FieldT, EncodableT]:
    """The record fields an attempt's outcome writes (in one HSET, under the record's TTL): its entry, the
    count of attempts made, and delivered (a 2xx) or the next attempt's number (a later copy of this one is
    stale)."""
    fields: dict[FieldT, EncodableT] = {
        keys.webhook_attempt_field(attempt.attempt): json.dumps(asdict(attempt)),
        keys.WEBHOOK_ATTEMPT_COUNT_FIELD: attempt.attempt + 1,
    }
    if attempt.ok:
        fields["webhook_delivered"] = "1"
    else:
        fields["webhook_next"] = attempt.attempt + 1
    return fields


def attempts_in(record_fields: Mapping[str, str]) -> list[dict]:
    """The attempts recorded in a record's fields (an HGETALL reply), in attempt order."""
    entries = [
        (int(name.removeprefix(keys.WEBHOOK_ATTEMPT_FIELD_PREFIX)), value)
        for name, value in record_fields.items()
        if name.startswith(keys.WEBHOOK_ATTEMPT_FIELD_PREFIX)
    ]
    return [json.loads(value) for _, value in sorted(entries)]


def list_attempts(store: JobStore, request_id: str) -> list[dict]:
    return attempts_in(cast(dict[str, str], store.redis.hgetall(keys.job(request_id))))  # a decoding client


def webhook_policy(settings: FetchSettings) -> NetPolicy:
    """Receivers may listen on any port; which addresses they may have follows the image-URL rules."""
    return NetPolicy.from_settings(settings, allowed_ports=None, purpose="webhook URLs")


REFUSED_PREFIX = "webhook URL refused: "


def post(
    url: str, body: bytes, headers: dict[str, str], timeout: float, policy: NetPolicy
) -> tuple[int | None, str | None]:
    """One delivery attempt through the SSRF guard, no redirects: (HTTP status or None, error text or None).
    Any 2xx counts as delivered; an error starting with REFUSED_PREFIX means the policy refused the URL."""
    try:
        target = parse_http_url(url, policy)
        sent = [
            (b"Host", target.host_header),
            (b"Content-Type", b"application/json"),
            (b"Content-Length", str(len(body)).encode()),
            (b"User-Agent", b"birefnet-serve webhooks"),
            *((name.encode(), value.encode()) for name, value in headers.items()),
        ]
        with guarded_pool(policy, timeout) as (pool, _backend):
            response = pool.request(
                "POST",
                target.core_url(),
                headers=sent,
                content=body,
                extensions={
                    "timeout": {"connect": timeout, "read": timeout, "write": timeout, "pool": timeout}
                },
            )
    except JobError as exc:  # the URL or its address is not allowed
        return None, REFUSED_PREFIX + exc.message
    except (httpcore.TimeoutException, httpcore.NetworkError, httpcore.ProtocolError, OSError) as exc:
        return None, f"{type(exc).__name__}: {exc}"
    if 200 <= response.status < 300:
        return response.status, None
    return response.status, f"HTTP {response.status}"


# Seconds a deliverer's pop blocks (under the clients' 5 s socket timeout): the longest an outcome waits in
# the deliverer's outbox for the next pop.
READY_WAIT = 2.0


def attempt_seconds(settings: WebhookTimingSettings) -> int:
    """The longest an attempt can run, with margin: connect, write and read (each up to webhook_timeout),
    the outcome's write (up to READY_WAIT after the post, with the deliverer's next pop), and a slow
    process's pauses. An attempt's lock outlives its deliverer this long."""
    return int(5 * settings.webhook_timeout + READY_WAIT) + 3


def first_attempt_due(settings: WebhookTimingSettings) -> float:
    """When attempt 0's booking (made with the completion, common.state.jobs.JobStore.complete) falls due:
    once an attempt started from the hand-off within a timeout of the completion must have ended. A later
    copy from the pump finds the attempt recorded (or, if its deliverer died, makes it)."""
    return time.time() + settings.webhook_timeout + attempt_seconds(settings)


@dataclass(frozen=True)
class Handoff:
    """Attempt 0 of a completed job's webhook as the completion hands it to the deliverers (a JSON object on
    the ready list, written by the completion script): the booking, when it falls due, and what the
    attempt posts. An entry that is a bare booking ("<request id>|<attempt>") is read as None."""

    request_id: str
    attempt: int
    due: float
    delivery: Delivery

    @classmethod
    def parse(cls, entry: str) -> Handoff | None:
        if not entry.startswith("{"):
            return None
        fields = json.loads(entry)
        request_id, _, attempt = str(fields["booking"]).rpartition("|")
        return cls(
            request_id,
            int(attempt),
            float(fields["due"]),
            Delivery(
                request_id=request_id,
                status=Status.COMPLETED,
                result=json.loads(fields["result"]) if fields.get("result") else None,
                result_code=int(fields["result_code"]) if fields.get("result_code") else None,
                error=fields.get("error") or None,
                webhook_url=fields["url"],
                user_id=fields.get("user") or "system",
                delivered=False,
                next_attempt=0,
            ),
        )


def retry_delay(settings: WebhookTimingSettings, attempt: int, jitter: bool = True) -> float:
    """Seconds between attempt `attempt` (0 = the first) failing and the next one: the doubling delay, with
    equal jitter (half fixed, half random) so that the many webhooks of one receiver's outage do not all
    retry at the same instant. `jitter=False`: the upper bound (safety bookings)."""
    ceiling = min(settings.webhook_retry_base * 2**attempt, settings.webhook_retry_max_delay)
    return ceiling if not jitter else ceiling / 2 + random.uniform(0, ceiling / 2)


@dataclass(frozen=True)
class Outcome:
    """An attempt's outcome, to be written: the record's fields and the schedule's change."""

    request_id: str
    attempt: Attempt


class OutcomeOutbox:
    """Outcomes the deliverer's threads leave for its pop loop, which writes them in the round trip of its
    next pop (`WebhookSender.write_outcomes`). Until then each attempt's booking stays in the schedule: a
    deliverer killed with outcomes here has those attempts made again when their bookings fall due."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._outcomes: list[Outcome] = []

    def put(self, outcome: Outcome) -> None:
        with self._lock:
            self._outcomes.append(outcome)

    def take(self) -> list[Outcome]:
        with self._lock:
            taken, self._outcomes = self._outcomes, []
        return taken

    def put_back(self, outcomes: Sequence[Outcome]) -> None:
        """Outcomes whose write failed, for the next round trip (the writes are idempotent)."""
        with self._lock:
            self._outcomes[:0] = outcomes


_CLAIM_DUE = """
local items = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, member in ipairs(items) do redis.call('ZADD', KEYS[1], 'XX', ARGV[3], member) end
return items
"""


class WebhookSender:
    """Signs and delivers one attempt at a time; books retries; lists what finally failed."""

    def __init__(
        self,
        settings: DelivererSettings,
        store: JobStore,
        signer: WebhookSigner,
        outbox: OutcomeOutbox | None = None,
    ):
        self.settings = settings
        self.store = store
        self.signer = signer
        self.outbox = outbox  # None: each attempt writes its outcome itself, in a round trip of its own
        self.policy = webhook_policy(settings)
        self._claim_due = store.redis.register_script(_CLAIM_DUE)

    def deliver_handed(self, handoff: Handoff) -> Attempt | None:
        """Deliver a completion's hand-off: at once, without a read or a lock, when taken in time (its booking
        cannot fall due before the attempt ends); else as any booking (`deliver`)."""
        if time.time() + attempt_seconds(self.settings) > handoff.due:
            return self.deliver(handoff.request_id, handoff.attempt)
        return self._attempt(handoff.delivery, handoff.attempt)

    def deliver(self, request_id: str, attempt: int = 0) -> Attempt | None:
        """Deliver attempt `attempt`; None when there is nothing (more) to deliver."""
        redis = self.store.redis
        own = keys.webhook_booking(request_id, attempt)
        record = delivery_state(self.store, request_id)
        if (
            record is None
            or not record.status.is_terminal
            or not record.webhook_url
            or record.delivered
            or record.next_attempt > attempt
        ):
            redis.zrem(keys.WEBHOOK_DUE, own)  # nothing (more) to deliver: leave no booking behind
            return None
        # One run per attempt number at a time, however often it is handed out. The attempt's own booking
        # stays until its outcome is recorded: if this process dies first, the lock expires and the pump
        # hands the booking out again (at least once).
        lock_seconds = attempt_seconds(self.settings)
        if not redis.set(keys.webhook_try(request_id, attempt), "1", nx=True, ex=lock_seconds):
            return None
        return self._attempt(record, attempt)

    def _attempt(self, record: Delivery, attempt: int) -> Attempt:
        """Post, then record the outcome and book the next attempt (or list the webhook as failed), in one
        round trip or through the outbox; the attempt's booking goes with it."""
        assert record.webhook_url is not None
        request_id = record.request_id
        last = attempt >= self.settings.webhook_max_retries
        body = encode_payload(build_payload(record))
        headers = self.signer.headers(request_id, record.user_id, body)
        status_code, error = post(
            record.webhook_url, body, headers, self.settings.webhook_timeout, self.policy
        )
        refused = error is not None and error.startswith(REFUSED_PREFIX)
        result = Attempt(
            attempt=attempt,
            at=time.time(),
            status_code=status_code,
            ok=error is None,
            error=error,
            final=error is not None and (last or refused),
        )
        outcome = Outcome(request_id, result)
        if self.outbox is not None:
            self.outbox.put(outcome)
        else:
            pipe = self.store.redis.pipeline(transaction=False)
            self.write_outcomes(pipe, [outcome])
            pipe.execute()
        return result

    def write_outcomes(self, pipe: Pipeline, outcomes: Sequence[Outcome]) -> None:
        """Queue on `pipe` the writes of `outcomes`: each attempt's entry and mark in its record (an HSET),
        their bookings taken back (one ZREM), and each failed attempt's retry booked or its webhook listed
        as failed."""
        if not outcomes:
            return
        for outcome in outcomes:
            pipe.hset(keys.job(outcome.request_id), mapping=attempt_fields(outcome.attempt))
        pipe.zrem(
            keys.WEBHOOK_DUE,
            *(keys.webhook_booking(outcome.request_id, outcome.attempt.attempt) for outcome in outcomes),
        )
        for outcome in outcomes:
            result, request_id = outcome.attempt, outcome.request_id
            if result.final:  # a refused URL stays refused: no retry
                pipe.zadd(keys.WEBHOOK_FAILED, {request_id: result.at})
            elif not result.ok:
                successor = keys.webhook_booking(request_id, result.attempt + 1)
                pipe.zadd(
                    keys.WEBHOOK_DUE, {successor: result.at + retry_delay(self.settings, result.attempt)}
                )

    def claim_due(self, limit: int = 100) -> list[tuple[str, int]]:
        """Attempts whose time has come, for this pump to hand out. Each stays booked, due again after a
        grace period, until its attempt's outcome removes the booking: an attempt whose deliverer died is
        handed out again, and a copy of one under way finds it locked. Atomic, so one pump sends each."""
        grace = 4 * self.settings.webhook_timeout
        items = self._claim_due(keys=[keys.WEBHOOK_DUE], args=[time.time(), limit, time.time() + grace])
        return [(rid, int(attempt)) for rid, _, attempt in (item.rpartition("|") for item in items)]

    def pop_due(self, limit: int = 100) -> list[tuple[str, int]]:
        """Retries whose time has come, removed from the schedule (each goes to exactly one caller)."""
        items = self.store.pop_due(keys.WEBHOOK_DUE, limit)
        return [(rid, int(attempt)) for rid, _, attempt in (item.rpartition("|") for item in items)]

    def failed(self, limit: int = 100) -> list[dict]:
        """Requests whose webhook never got a 2xx, newest first, with every attempt."""
        return failed_webhooks(self.store, limit)


def failed_webhooks(store: JobStore, limit: int = 100) -> list[dict]:
    """Requests whose webhook never got a 2xx, newest first, with every attempt."""
    entries = cast(
        list[tuple[str, float]], store.redis.zrevrange(keys.WEBHOOK_FAILED, 0, limit - 1, withscores=True)
    )  # a decoding client: str replies
    out = []
    for request_id, failed_at in entries:
        raw = cast(dict[str, str], store.redis.hgetall(keys.job(request_id)))  # a decoding client
        spec = JobSpec.model_validate_json(raw["spec"]) if raw.get("spec") else None
        out.append(
            {
                "request_id": request_id,
                "failed_at": failed_at,
                "webhook_url": spec.webhook_url if spec else None,
                "owner": spec.owner if spec else None,
                "attempts": attempts_in(raw),
            }
        )
    return out
