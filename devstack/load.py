"""Load through a loopback stack's gateway, and what became of the jobs: the benchmarks' load runs and the
chaos and load tests' submitters and completion checks. Every wait is bounded in time."""

from __future__ import annotations

import base64
import io
import math
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
import redis
from PIL import Image

from common.state.jobs import JobRecord, JobStore
from devstack.builder import wait_for
from devstack.loopback import LoopbackStack
from devstack.receiver import WebhookReceiver

V2 = "/queue/fal-ai/birefnet/v2"


def small_png(seed: int) -> bytes:
    """A distinct small picture per job (a square on a background), a few hundred bytes."""
    color = ((seed * 37) % 256, (seed * 91) % 256, (seed * 53) % 256)
    image = Image.new("RGB", (96 + seed % 17, 64 + seed % 13), color)
    image.paste((255 - color[0], 255 - color[1], 255 - color[2]), (20, 16, 60, 48))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


# --- submitting ------------------------------------------------------------------------------------
class GatewaySubmitter:
    """fal-style submits with a webhook; a 503 or a refused connection means 'not accepted, try again'."""

    def __init__(self, base_url: str, webhook_url: str | None, credential: str):
        self.client = httpx.Client(
            base_url=base_url, headers={"Authorization": f"Key {credential}"}, timeout=30
        )
        self.webhook_url = webhook_url
        self.refused = 0  # answers that were not an acceptance (retried)

    def submit(self, body: dict, attempts: int = 120) -> str:
        params = {"fal_webhook": self.webhook_url} if self.webhook_url else None
        for _ in range(attempts):
            try:
                response = self.client.post(V2, json=body, params=params)
            except httpx.TransportError:
                response = None
            if response is not None and response.status_code == 200:
                return response.json()["request_id"]
            assert response is None or response.status_code >= 500, response.text
            self.refused += 1
            time.sleep(0.25)
        raise AssertionError(f"the gateway did not accept a request in {attempts} tries")

    def close(self) -> None:
        self.client.close()


@dataclass
class Submitted:
    api: list[str] = field(default_factory=list)  # accepted request ids
    s3_keys: list[str] = field(default_factory=list)  # uploaded keys (each must become one job)
    times: dict[str, float] = field(default_factory=dict)  # request id or key -> when it was accepted
    refused: int = 0  # gateway answers that were not an acceptance (503 while Redis was down), retried


# --- what became of the jobs ---------------------------------------------------------------------------
def job_records(store: JobStore) -> dict[str, JobRecord]:
    records = {}
    for key in store.redis.scan_iter("birefnet:job:*", count=1000):
        if key.count(":") == 2:
            record = store.get(key.rsplit(":", 1)[1])
            if record is not None:
                records[record.request_id] = record
    return records


def jobs_by_key(records: dict[str, JobRecord], bucket: str) -> dict[str, list[str]]:
    """Uploaded key -> ids of the jobs made from it (the promise: exactly one)."""
    out: dict[str, list[str]] = {}
    for record in records.values():
        if record.spec.source == "s3_event" and record.spec.image_url.startswith(f"s3://{bucket}/"):
            out.setdefault(record.spec.image_url.split("/", 3)[3], []).append(record.request_id)
    return out


def expected_ids(submitted: Submitted, records: dict[str, JobRecord], bucket: str) -> list[str] | None:
    """Ids of every accepted job, or None while some upload has no job yet."""
    by_key = jobs_by_key(records, bucket)
    if any(key not in by_key for key in submitted.s3_keys):
        return None
    return [*submitted.api, *(rid for key in submitted.s3_keys for rid in by_key[key])]


def delivered_ids(receiver: WebhookReceiver) -> set[str]:
    return {item.json()["request_id"] for item in list(receiver.received)}


def wait_for_completions(
    store: JobStore, bucket: str, submitted: Submitted, receiver: WebhookReceiver | None, timeout: float
) -> list[str]:
    """The ids of every accepted job once all are COMPLETED (and, with a receiver, have their webhook)."""

    def done() -> list[str] | None:
        try:
            records = job_records(store)
        except redis.RedisError:
            return None
        ids = expected_ids(submitted, records, bucket)
        if ids is None or any(records[rid].status != "COMPLETED" for rid in ids):
            return None
        if receiver is not None and not set(ids) <= delivered_ids(receiver):
            return None
        return ids

    return wait_for(done, timeout, "every accepted job to complete with its webhook", interval=0.5)


def wait_all_done(
    stack: LoopbackStack, submitted: Submitted, receiver: WebhookReceiver | None, timeout: float
) -> list[str]:
    """Wait until every accepted job is COMPLETED (and, with a receiver, has its webhook)."""
    store = stack.store()
    try:
        return wait_for_completions(store, stack.settings.input_bucket, submitted, receiver, timeout)
    finally:
        store.redis.close()


# --- load ----------------------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered), max(1, math.ceil(len(ordered) * q / 100))) - 1]


def stamp_arrivals(receiver: WebhookReceiver) -> None:
    """Give every webhook the receiver records its arrival time (`.at`)."""

    class Stamped(list):
        def append(self, item) -> None:
            item.at = time.time()
            super().append(item)

    receiver.received = Stamped(receiver.received)


def spread(values: list[float]) -> dict[str, float]:
    return {
        "p50": round(percentile(values, 50), 3),
        "p95": round(percentile(values, 95), 3),
        "max": round(max(values), 3) if values else float("nan"),
    }


def run_load(
    stack: LoopbackStack,
    receiver: WebhookReceiver,
    jobs: int,
    *,
    concurrency: int = 8,
    rate: float | None = None,
    timeout: float = 900,
    image: Callable[[int], bytes] = small_png,
) -> dict:
    """Submit `jobs` requests (`image(n)` as a data URI) through the gateway (all at once, or `rate` per
    second), wait for every result and webhook, and measure: throughput, and per job submit → COMPLETED and
    submit → webhook."""
    stamp_arrivals(receiver)
    sent_at: dict[str, float] = {}
    submitter = GatewaySubmitter(stack.gateway_url, receiver.url, stack.credential)
    submitter.client = httpx.Client(
        base_url=stack.gateway_url,
        headers={"Authorization": f"Key {stack.credential}"},
        timeout=60,
        limits=httpx.Limits(max_connections=concurrency),
    )

    def one(n: int) -> None:
        began = time.time()
        sent_at[submitter.submit({"image_url": data_uri(image(n))})] = began

    started = time.time()
    with ThreadPoolExecutor(concurrency) as pool:
        futures = []
        for n in range(jobs):
            if rate:
                time.sleep(max(0.0, started + n / rate - time.time()))
            futures.append(pool.submit(one, n))
        for future in futures:
            future.result()
    submitter.close()
    submitted = Submitted(api=list(sent_at))
    wait_all_done(stack, submitted, receiver, timeout=timeout)
    store = stack.store()
    found = {rid: store.get(rid) for rid in sent_at}
    store.redis.close()
    records = {rid: record for rid, record in found.items() if record is not None}
    arrivals: dict[str, list[float]] = {}
    for item in list(receiver.received):
        arrivals.setdefault(item.json()["request_id"], []).append(item.at)  # type: ignore[attr-defined]  # set by stamp_arrivals
    finished = max(r.completed_at or 0.0 for r in records.values())
    return {
        "jobs": jobs,
        "ok": sum(r.ok for r in records.values()),
        "concurrency": concurrency,
        "rate": rate,
        "seconds": round(finished - started, 2),
        "throughput": round(jobs / (finished - started), 2),
        "latency": spread([(r.completed_at or 0.0) - sent_at[rid] for rid, r in records.items()]),
        "webhook_latency": spread([min(arrivals[rid]) - sent_at[rid] for rid in records]),
        "run": spread([(r.completed_at or 0.0) - (r.started_at or 0.0) for r in records.values()]),
        "webhooks_per_job": sorted(Counter(len(arrivals.get(rid, [])) for rid in records).items()),
    }
