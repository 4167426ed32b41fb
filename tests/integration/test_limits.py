"""Per-key limits and queue caps against a real redis-server, the gateway on HTTP and moto's S3+SQS.

No worker runs here, so accepted requests stay IN_QUEUE: exactly the state the limits count.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import httpx
import pytest
import redis

from common.adapters.storage import (
    KEPT_INPUT,
    KEPT_MANIFEST,
    KEPT_MASK,
    boto_config,
    make_sqs_client,
    request_output_prefix,
)
from common.domain.auth import hash_secret
from common.settings import Settings
from common.state import keys
from common.state.jobs import JobStore
from common.state.limits import Limiter
from producer.intake import build_intake
from producer.sqs import SqsConsumer
from tests.helpers.gateway import GatewayServer, GatewayStack, auth, start_gateway_stack
from tests.helpers.images import data_uri, png_bytes
from tests.helpers.stack import Stack, wait_for

V2 = "/queue/fal-ai/birefnet/v2"
RUN = "/run/fal-ai/birefnet/v2"
LIMITED = {"concurrent": "c-secret", "rate": "r-secret", "free": "f-secret"}


def cred(key_id: str) -> str:
    return f"{key_id}:{LIMITED[key_id]}"


def limited_keys() -> str:
    return json.dumps(
        [
            {"id": "concurrent", "hash": hash_secret(LIMITED["concurrent"], "sha256"), "max_concurrent": 2},
            {"id": "rate", "hash": hash_secret(LIMITED["rate"], "sha256"), "requests_per_minute": 3},
            {"id": "free", "hash": hash_secret(LIMITED["free"], "sha256")},
        ]
    )


@pytest.fixture
def gs(redis_server, moto_endpoint, tmp_path: Path) -> Iterator[GatewayStack]:
    stack = start_gateway_stack(
        redis_server.port,
        moto_endpoint,
        tmp_path,
        workers=(),
        webhooks=False,
        extra={
            "BIREFNET_GATEWAY_API_KEYS": limited_keys(),
            "BIREFNET_MAX_QUEUE_DEPTH_PER_VARIANT": json.dumps({"general-heavy": 2}),
            "BIREFNET_QUEUE_FULL_RETRY_AFTER": "7",
        },
    )
    yield stack
    stack.close()


def body(model: str = "General Use (Light)") -> dict:
    return {"image_url": data_uri(png_bytes()), "model": model}


def assert_429(response, error_type: str) -> int:
    assert response.status_code == 429, response.text
    assert response.json()["error_type"] == error_type and response.json()["detail"]
    assert response.headers["x-fal-error-type"] == error_type
    return int(response.headers["retry-after"])


def test_max_concurrent_counts_queued_requests_and_frees_slots_on_completion(gs: GatewayStack):
    second_gateway = GatewayServer(gs.settings).start()  # another gateway process would see the same Redis
    try:
        with httpx.Client(
            base_url=second_gateway.url, headers=auth(cred("concurrent")), timeout=30
        ) as elsewhere:
            first = elsewhere.post(V2, json=body()).json()["request_id"]
            with gs.client(cred("concurrent")) as client:
                second = client.post(V2, json=body()).json()["request_id"]
            assert_429(elsewhere.post(V2, json=body()), "concurrency_limit")
    finally:
        second_gateway.stop()
    with gs.client(cred("concurrent")) as client, gs.client(cred("free")) as other:
        assert_429(client.post(V2, json=body()), "concurrency_limit")
        assert_429(client.post(RUN, json=body()), "concurrency_limit")  # sync run: the same limit
        assert other.post(V2, json=body()).status_code == 200, "another key is not limited by this one"
        # A cancelled request is COMPLETED: its slot is free for the next submit.
        assert client.put(f"/queue/fal-ai/birefnet/requests/{first}/cancel").status_code == 202
        assert client.post(V2, json=body()).status_code == 200
        assert_429(client.post(V2, json=body()), "concurrency_limit")
        # A record that is gone (expired days later, or lost with Redis data) holds no slot either.
        r = redis.Redis.from_url(gs.settings.redis_url)
        r.delete(keys.job(second))
        r.zadd("birefnet:limits:active:concurrent", {second: time.time() - 3600})
        assert client.post(V2, json=body()).status_code == 200


def test_requests_per_minute_is_a_sliding_window_shared_by_submit_and_run(gs: GatewayStack):
    with gs.client(cred("rate")) as client:
        for _ in range(3):
            assert client.post(V2, json=body()).status_code == 200
        retry_after = assert_429(client.post(V2, json=body()), "rate_limited")
        assert 1 <= retry_after <= 60
        assert_429(client.post(RUN, json=body()), "rate_limited")
        # Refused requests are not counted: after the window the key has its full rate again (checked by
        # moving the admitted entries a minute back, which is what the window's clock would do).
        r = redis.Redis.from_url(gs.settings.redis_url, decode_responses=True)
        key = "birefnet:limits:rate:rate"
        assert r.zcard(key) == 3
        for member, score in r.zrange(key, 0, -1, withscores=True):
            r.zadd(key, {member: score - 61})
        for _ in range(3):
            assert client.post(V2, json=body()).status_code == 200
        assert_429(client.post(V2, json=body()), "rate_limited")


def test_queue_caps_fal_max_queue_length_and_per_variant_depth(gs: GatewayStack):
    with gs.client(cred("free")) as client:
        for _ in range(3):
            assert client.post(V2, json=body()).status_code == 200  # general-light: no configured cap
        assert_429(client.post(V2, json=body(), params={"fal_max_queue_length": 3}), "queue_full")
        assert client.post(V2, json=body(), params={"fal_max_queue_length": 4}).status_code == 200
        assert client.post(V2, json=body(), params={"fal_max_queue_length": "x"}).status_code == 422
        # general-heavy is capped at 2 by max_queue_depth_per_variant; a larger fal_max_queue_length cannot
        # raise it.
        heavy = body("General Use (Heavy)")
        assert client.post(V2, json=heavy).status_code == 200
        assert client.post(V2, json=heavy, params={"fal_max_queue_length": 10}).status_code == 200
        assert assert_429(client.post(V2, json=heavy, params={"fal_max_queue_length": 10}), "queue_full") == 7
        assert_429(client.post(RUN, json=heavy), "queue_full")
        # Invalid input never waits in a queue: it is answered (COMPLETED with 422) even when the queue is
        # full.
        assert client.post(V2, json={"model": "General Use (Heavy)"}).status_code == 200


def kept_source(gs: GatewayStack, owner: str) -> str:
    """A finished request of `owner` with its mask kept, as a worker leaves one (no worker runs here)."""
    settings = gs.settings
    source_id = str(uuid.uuid4())
    prefix = request_output_prefix(settings, source_id)
    s3 = boto3.client(
        "s3", region_name=settings.aws_region, endpoint_url=settings.s3_endpoint_url, config=boto_config()
    )
    bucket = settings.output_bucket
    s3.put_object(Bucket=bucket, Key=prefix + KEPT_MASK, Body=png_bytes())
    s3.put_object(Bucket=bucket, Key=prefix + KEPT_INPUT, Body=png_bytes())
    manifest = {
        "request_id": source_id,
        "owner": owner,
        "variant": "general-light",
        "endpoint": "v2",
        "operating_resolution": "1024x1024",
        "input": f"s3://{bucket}/{prefix}{KEPT_INPUT}",
        "mask": f"s3://{bucket}/{prefix}{KEPT_MASK}",
        "width": 8,
        "height": 8,
        "created_at": time.time(),
    }
    s3.put_object(Bucket=bucket, Key=prefix + KEPT_MANIFEST, Body=json.dumps(manifest).encode())
    return source_id


def test_compose_requests_meet_the_same_limits(gs: GatewayStack):
    """Compose is a way into the queue like submit: the key's limits count it and refuse it alike."""
    source = kept_source(gs, "concurrent")
    compose = f"/queue/fal-ai/birefnet/requests/{source}/compose"
    with gs.client(cred("concurrent")) as client:
        assert client.post(compose, json={"output_mask": True}).status_code == 200
        assert client.post(V2, json=body()).status_code == 200
        assert_429(client.post(compose, json={"output_mask": True}), "concurrency_limit")
        assert_429(
            client.post(f"/run/fal-ai/birefnet/requests/{source}/compose", json={}), "concurrency_limit"
        )
        assert_429(client.post(V2, json=body()), "concurrency_limit")
    rate_source = kept_source(gs, "rate")
    with gs.client(cred("rate")) as client:
        for _ in range(3):
            assert (
                client.post(f"/queue/fal-ai/birefnet/requests/{rate_source}/compose", json={}).status_code
                == 200
            )
        assert_429(
            client.post(f"/queue/fal-ai/birefnet/requests/{rate_source}/compose", json={}), "rate_limited"
        )


def test_a_slot_taken_by_a_gateway_that_died_before_creating_its_job_is_freed(redis_server, tmp_path: Path):
    """Admitted, then crashed before the job record was written: after the grace period the slot is free."""
    client = redis.Redis(port=redis_server.port, db=14, decode_responses=True)
    client.flushdb()
    limiter = Limiter(client, Settings(redis_url=f"redis://127.0.0.1:{redis_server.port}/14"))
    key = f"k-{uuid.uuid4().hex[:6]}"
    assert limiter.admit(key_id=key, request_id="lost", variant="general-light", max_concurrent=1) is None
    refused = limiter.admit(key_id=key, request_id="next", variant="general-light", max_concurrent=1)
    assert refused is not None and refused.reason == "concurrency_limit", "young: the record may still come"
    client.zadd(f"birefnet:limits:active:{key}", {"lost": time.time() - 61})  # the grace period has passed
    assert limiter.admit(key_id=key, request_id="next", variant="general-light", max_concurrent=1) is None


# --- S3 events: backpressure ------------------------------------------------------------------------
def sqs_counts(stack: Stack) -> tuple[int, int]:
    sqs = boto3.client(
        "sqs", region_name=stack.settings.aws_region, endpoint_url=stack.settings.sqs_endpoint_url
    )
    attrs = sqs.get_queue_attributes(
        QueueUrl=stack.settings.sqs_queue_url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"]), int(attrs["ApproximateNumberOfMessagesNotVisible"])


def test_uploads_wait_in_sqs_while_the_queue_is_full(stack: Stack):
    settings = stack.settings.model_copy(update={"max_queue_depth": 2, "queue_full_retry_after": 1})
    intake = build_intake(settings)
    consumer = SqsConsumer(
        make_sqs_client(settings),
        settings.sqs_queue_url,
        intake,
        wait_seconds=1,
        has_room=intake.limiter.queue_has_room,
    )
    s3 = boto3.client(
        "s3", region_name=settings.aws_region, endpoint_url=settings.s3_endpoint_url, config=boto_config()
    )
    s3.put_object(Bucket=settings.input_bucket, Key="warmup.txt", Body=b"x")  # not an image: consumed
    for n in range(5):
        s3.put_object(Bucket=settings.input_bucket, Key=f"bp/{n}.png", Body=png_bytes())
    store = intake.store
    stop = threading.Event()
    thread = threading.Thread(target=consumer.run, args=(stop,), daemon=True)
    thread.start()
    try:
        wait_for(lambda: store.queue_depth("general-light") == 2 and consumer.full, 30, "the queue to fill")
        time.sleep(2.5)  # a few pause periods: nothing more is taken, nothing is dropped
        assert store.queue_depth("general-light") == 2
        assert sum(sqs_counts(stack)) == 3, "the three events that found no room are still in SQS"
        # Workers take jobs (here: the queued ones are cancelled): room again, the waiting events come in.
        for _ in range(2):
            for rid in list(store.redis.zrange(keys.pending("general-light"), 0, -1)):
                store.cancel(rid)
            time.sleep(0.1)
            wait_for(
                lambda: store.queue_depth("general-light") > 0 or sum(sqs_counts(stack)) == 0,
                30,
                "waiting events to be taken",
            )
        for rid in list(store.redis.zrange(keys.pending("general-light"), 0, -1)):
            store.cancel(rid)
        wait_for(lambda: sum(sqs_counts(stack)) == 0, 30, "every event to be consumed")
    finally:
        stop.set()
        thread.join(timeout=15)
    uploads = {key for key in store.redis.scan_iter("birefnet:job:*") if key.count(":") == 2}
    images = sorted(json.loads(store.redis.hget(k, "spec"))["image_url"] for k in uploads)
    assert images == [f"s3://{settings.input_bucket}/bp/{n}.png" for n in range(5)], "one job per upload"


def test_minio_events_get_503_queue_full_until_there_is_room(stack: Stack):
    from producer.http_receiver import create_app
    from tests.helpers.pipeline import minio_body, put
    from tests.helpers.servers import serve

    settings = stack.settings.model_copy(update={"max_queue_depth": 1, "queue_full_retry_after": 3})
    put(stack, "m/one.png")
    put(stack, "m/two.png")
    with serve(create_app(settings)) as url:
        first = httpx.post(f"{url}/s3-events", content=minio_body(settings.input_bucket, "m/one.png"))
        second = httpx.post(f"{url}/s3-events", content=minio_body(settings.input_bucket, "m/two.png"))
        assert first.status_code == 200, first.text
        assert second.status_code == 503 and second.json()["error_type"] == "queue_full"
        assert second.headers["retry-after"] == "3"
        store = JobStore.from_url(settings.redis_url)
        store.cancel(first.json()["request_ids"][0])  # the queue has room again
        again = httpx.post(f"{url}/s3-events", content=minio_body(settings.input_bucket, "m/two.png"))
        assert again.status_code == 200, again.text
    assert store.get(again.json()["request_ids"][0]).status == "IN_QUEUE"
