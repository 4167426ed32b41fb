"""fal-style webhook payloads, signed delivery through the SSRF guard, and retries (docs/api.md#webhooks).

Deliveries run in the deliverer (deliverer/), so GPU workers never wait on HTTP; no Celery task carries
them. Every attempt is booked in the due zset: the first by the completion itself (which also hands it to
the deliverers on the ready list), each retry by the failed attempt before it. A booking stays until its
attempt's outcome is recorded, and the deliverer's pump hands out bookings as they fall due, so a
deliverer dying after taking an attempt, or mid-attempt, leaves the attempt behind (its lock expires).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from typing import cast

import httpcore

from common.adapters.netguard import NetPolicy, guarded_pool, parse_http_url
from common.domain.errors import JobError
from common.domain.signing import WebhookSigner
from common.settings import DelivererSettings, FetchSettings, WebhookTimingSettings
from common.state import keys
from common.state.jobs import JobRecord, JobStore


def error_summary(record: JobRecord) -> str | None:
    """fal's `error` string: "Invalid status code: <code>" for 4xx, the message otherwise."""
    if record.ok:
        return None
    code = record.result_code or 500
    return f"Invalid status code: {code}" if 400 <= code < 500 else (record.error or "Internal error")


def build_payload(record: JobRecord) -> dict:
    return {
        "request_id": record.request_id,
        "gateway_request_id": record.request_id,
        "status": "OK" if record.ok else "ERROR",
        "payload": record.result,
        "error": error_summary(record),
    }


def encode_payload(payload: dict) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


def webhook_user_id(record: JobRecord) -> str:
    """X-Fal-Webhook-User-Id: the key owner's user id (set by the gateway), else the job's owner."""
    return str(record.spec.extra.get("user_id") or record.spec.owner or "system")


@dataclass
class Attempt:
    attempt: int
    at: float
    status_code: int | None
    ok: bool
    error: str | None = None
    final: bool = False  # no retry follows: the URL is refused by the network policy, or retries ran out


def record_attempt(store: JobStore, request_id: str, attempt: Attempt, pipe=None) -> None:
    """Append the attempt (on the caller's pipeline, if given: sent with its other writes)."""
    key = keys.webhook_attempts(request_id)
    target = pipe if pipe is not None else store.redis.pipeline(transaction=False)
    target.rpush(key, json.dumps(asdict(attempt)))
    target.expire(key, store.record_ttl)
    if attempt.ok:
        target.hset(keys.job(request_id), "webhook_delivered", "1")
    if pipe is None:
        target.execute()


def list_attempts(store: JobStore, request_id: str) -> list[dict]:
    return [json.loads(item) for item in store.redis.lrange(keys.webhook_attempts(request_id), 0, -1)]


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


def first_attempt_due(settings: WebhookTimingSettings) -> float:
    """When attempt 0's booking (made with the completion, common.state.jobs.JobStore.complete) falls due:
    after the hand-off made at completion had its chance. The hand-off and the pump then race; whichever copy
    runs first delivers, and the attempt removes the booking."""
    return time.time() + settings.webhook_timeout + retry_delay(settings, 0, jitter=False)


def retry_delay(settings: WebhookTimingSettings, attempt: int, jitter: bool = True) -> float:
    """Seconds between attempt `attempt` (0 = the first) failing and the next one: the doubling delay, with
    equal jitter (half fixed, half random) so that the many webhooks of one receiver's outage do not all
    retry at the same instant. `jitter=False`: the upper bound (safety bookings)."""
    ceiling = min(settings.webhook_retry_base * 2**attempt, settings.webhook_retry_max_delay)
    return ceiling if not jitter else ceiling / 2 + random.uniform(0, ceiling / 2)


_CLAIM_DUE = """
local items = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, member in ipairs(items) do redis.call('ZADD', KEYS[1], 'XX', ARGV[3], member) end
return items
"""


class WebhookSender:
    """Signs and delivers one attempt at a time; books retries; lists what finally failed."""

    def __init__(self, settings: DelivererSettings, store: JobStore, signer: WebhookSigner):
        self.settings = settings
        self.store = store
        self.signer = signer
        self.policy = webhook_policy(settings)
        self._claim_due = store.redis.register_script(_CLAIM_DUE)

    def deliver(self, request_id: str, attempt: int = 0) -> Attempt | None:
        """Deliver attempt `attempt`; None when there is nothing (more) to deliver."""
        redis = self.store.redis
        own, successor = (
            keys.webhook_booking(request_id, attempt),
            keys.webhook_booking(request_id, attempt + 1),
        )
        record = self.store.get(request_id)
        if (
            record is None
            or not record.status.is_terminal
            or not record.spec.webhook_url
            or record.webhook_delivered
            or record.webhook_next > attempt
        ):
            redis.zrem(keys.WEBHOOK_DUE, own)  # nothing (more) to deliver: leave no booking behind
            return None
        last = attempt >= self.settings.webhook_max_retries
        # One run per attempt number at a time, however often it is handed out. The attempt's own booking
        # stays until its outcome is recorded: if this process dies first, the lock expires and the pump
        # hands the booking out again (at least once).
        taken = redis.set(keys.webhook_try(request_id, attempt), "1", nx=True, ex=self.attempt_lock_seconds)
        if not taken:
            return None

        body = encode_payload(build_payload(record))
        headers = self.signer.headers(request_id, webhook_user_id(record), body)
        status_code, error = post(
            record.spec.webhook_url, body, headers, self.settings.webhook_timeout, self.policy
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
        pipe = redis.pipeline(transaction=False)  # the outcome's writes in one round trip
        record_attempt(self.store, request_id, result, pipe)  # (a success also marks the record delivered)
        pipe.zrem(keys.WEBHOOK_DUE, own)
        if not result.ok:
            pipe.hset(keys.job(request_id), "webhook_next", attempt + 1)  # a late copy of this one is stale
        if result.final:  # a refused URL stays refused: no retry
            pipe.zadd(keys.WEBHOOK_FAILED, {request_id: result.at})
        elif not result.ok:
            pipe.zadd(keys.WEBHOOK_DUE, {successor: result.at + retry_delay(self.settings, attempt)})
        pipe.execute()
        return result

    @property
    def attempt_lock_seconds(self) -> int:
        """How long an attempt's lock outlives a deliverer that died holding it: past the longest post
        (connect, write and read, each up to webhook_timeout) and the pump's grace."""
        return int(5 * self.settings.webhook_timeout) + 5

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
        record = store.get(request_id)
        out.append(
            {
                "request_id": request_id,
                "failed_at": failed_at,
                "webhook_url": record.spec.webhook_url if record else None,
                "owner": record.spec.owner if record else None,
                "attempts": list_attempts(store, request_id),
            }
        )
    return out
