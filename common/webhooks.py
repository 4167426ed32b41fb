"""fal-style webhook payloads and delivery (FAL_API.md §9).

Deliveries run on the `webhooks` Celery queue (producer/webhook_worker.py), so GPU workers never wait on
HTTP. Every attempt is recorded on the job (`birefnet:webhook:<id>`), so ops can list failures.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import httpx

from common.jobs import PREFIX, JobRecord, JobStore


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


@dataclass
class Attempt:
    attempt: int
    at: float
    status_code: int | None
    ok: bool
    error: str | None = None


def attempts_key(request_id: str) -> str:
    return f"{PREFIX}webhook:{request_id}"


def record_attempt(store: JobStore, request_id: str, attempt: Attempt) -> None:
    key = attempts_key(request_id)
    pipe = store.redis.pipeline()
    pipe.rpush(key, json.dumps(attempt.__dict__))
    pipe.expire(key, store.record_ttl)
    if attempt.ok:
        pipe.hset(store.job_key(request_id), "webhook_delivered", "1")
    pipe.execute()


def list_attempts(store: JobStore, request_id: str) -> list[dict]:
    return [json.loads(item) for item in store.redis.lrange(attempts_key(request_id), 0, -1)]


def post(url: str, body: bytes, headers: dict[str, str], timeout: float) -> tuple[int | None, str | None]:
    """One delivery attempt: (HTTP status or None, error text or None). Any 2xx counts as delivered."""
    try:
        response = httpx.post(url, content=body, headers={"content-type": "application/json", **headers},
                              timeout=timeout, follow_redirects=False)
    except httpx.HTTPError as exc:
        return None, f"{type(exc).__name__}: {exc}"
    if 200 <= response.status_code < 300:
        return response.status_code, None
    return response.status_code, f"HTTP {response.status_code}"


def deliver_once(store: JobStore, request_id: str, *, timeout: float, attempt: int = 0) -> Attempt | None:
    """Deliver the webhook of a completed job once; None when there is nothing to deliver."""
    record = store.get(request_id)
    if record is None or record.status != "COMPLETED" or not record.spec.webhook_url:
        return None
    body = encode_payload(build_payload(record))
    status_code, error = post(record.spec.webhook_url, body, {}, timeout)
    result = Attempt(attempt=attempt, at=time.time(), status_code=status_code, ok=error is None, error=error)
    record_attempt(store, request_id, result)
    return result
