"""Two real Redis servers as two shards behind one gateway and one producer: a fal client's request to a
variant on shard 1, its status, result and cancel through the gateway, and a bucket upload for a shard-1
variant, all recorded and queued on shard 1 (and nothing of them on shard 0)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import redis

from common.state import keys
from common.state.jobs import JobStore
from common.state.shards import shard_index
from devstack.services import RedisServer
from producer.intake import build_intake
from producer.notifications import ObjectCreated
from tests.helpers.fal_client import run_client
from tests.helpers.gateway import GatewayStack, start_gateway_stack
from tests.helpers.images import data_uri, png_bytes
from tests.helpers.pipeline import put
from tests.helpers.stack import wait_for

SHARD_1_VARIANTS = ["general-light", "portrait"]  # a worker serves general-light; none serves portrait


@pytest.fixture(scope="module")
def shard1():
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def gs(redis_server, shard1, moto_endpoint, tmp_path_factory) -> Iterator[GatewayStack]:
    shards = [{"url": f"redis://127.0.0.1:{shard1.port}/3", "variants": SHARD_1_VARIANTS}]
    stack = start_gateway_stack(
        redis_server.port,
        moto_endpoint,
        tmp_path_factory.mktemp("shards"),
        tls=True,
        webhooks=False,
        extra={"BIREFNET_REDIS_SHARDS": json.dumps(shards)},
    )
    yield stack
    stack.close()


def on_shard(gs: GatewayStack, index: int) -> redis.Redis:
    url = gs.settings.redis_url if index == 0 else gs.settings.redis_shards[index - 1].url
    return redis.Redis.from_url(url, decode_responses=True)


@pytest.mark.timeout(240)
def test_a_fal_client_request_to_a_shard_1_variant(gs):
    got = run_client(
        gs,
        """
        handle = fal_client.submit(APP, arguments={"image_url": IMAGE})
        while not isinstance(handle.status(), Completed):
            time.sleep(0.1)
        status = handle.status(with_logs=True)
        out({"id": handle.request_id, "result": handle.get(), "logs": [e["message"] for e in status.logs],
             "by_id": fal_client.result(APP, handle.request_id) == handle.get()})
    """,
    )
    rid = got["id"]
    assert shard_index(rid) == 1 and got["by_id"] and "loading image" in got["logs"]
    assert got["result"]["image"]["width"] == 72
    assert JobStore(on_shard(gs, 1)).get(rid).spec.variant == "general-light"
    assert not on_shard(gs, 0).exists(keys.job(rid))
    with gs.client() as client:  # cancel through the gateway: found on shard 1, already done
        answer = client.put(f"/queue/fal-ai/birefnet/requests/{rid}/cancel")
        assert (answer.status_code, answer.json()["status"]) == (400, "ALREADY_COMPLETED")


def test_cancel_and_status_of_a_queued_shard_1_request(gs):
    with gs.client() as client:
        submitted = client.post(
            "/queue/fal-ai/birefnet/v2", json={"image_url": data_uri(png_bytes((8, 8))), "model": "Portrait"}
        ).json()
        rid = submitted["request_id"]
        assert shard_index(rid) == 1 and submitted["queue_position"] == 0
        assert on_shard(gs, 1).zscore(keys.pending("portrait"), rid) is not None
        status = client.get(f"/queue/fal-ai/birefnet/requests/{rid}/status")
        assert (status.status_code, status.json()["status"]) == (202, "IN_QUEUE")
        answer = client.put(f"/queue/fal-ai/birefnet/requests/{rid}/cancel")
        assert (answer.status_code, answer.json()["status"]) == (202, "CANCELLATION_REQUESTED")
        gs.wait_status(rid)
        assert client.get(f"/queue/fal-ai/birefnet/requests/{rid}").status_code == 499
        assert not on_shard(gs, 0).exists(keys.job(rid))


def test_an_s3_upload_for_a_shard_1_variant_lands_on_shard_1(gs):
    settings = gs.settings
    put(
        gs.stack, "cats/one.png", {"model": "General Use (Light)", "endpoint": "v2"}, body=png_bytes((40, 30))
    )
    rid = build_intake(settings).handle(
        ObjectCreated(settings.input_bucket, "cats/one.png", None, None, None, "ObjectCreated:Put")
    )
    assert rid is not None and shard_index(rid) == 1
    store = JobStore(on_shard(gs, 1))
    record = wait_for(
        lambda: (r := store.get(rid)) is not None and r.status == "COMPLETED" and r,
        60,
        f"{rid} to complete on shard 1",
    )
    assert record.ok and record.spec.source == "s3_event"
    assert not on_shard(gs, 0).exists(keys.job(rid))


def test_per_key_limits_stay_on_shard_0_and_count_requests_of_every_shard(redis_server, shard1):
    from common.settings import Settings
    from common.state.limits import Limiter
    from common.state.shards import request_id_on

    zero = redis.Redis.from_url(f"redis://127.0.0.1:{redis_server.port}/14", decode_responses=True)
    one = redis.Redis.from_url(f"redis://127.0.0.1:{shard1.port}/14", decode_responses=True)
    zero.flushdb(), one.flushdb()
    settings = Settings(max_queue_depth_per_variant={"portrait": 1})
    limiter = Limiter(
        zero,
        settings,
        queues=lambda v: one if v == "portrait" else zero,
        records=lambda rid: one if shard_index(rid) == 1 else zero,
    )
    first, second = request_id_on(1), request_id_on(1)
    assert limiter.admit(key_id="k", request_id=first, variant="portrait", max_concurrent=1) is None
    one.hset(keys.job(first), "status", "IN_PROGRESS")  # running on shard 1: the key's one slot is taken
    refused = limiter.admit(key_id="k", request_id=second, variant="general-light", max_concurrent=1)
    assert refused is not None and refused.error_type == "concurrency_limit"
    one.hset(keys.job(first), "status", "COMPLETED")  # completed there: the slot is free again
    assert limiter.admit(key_id="k", request_id=second, variant="general-light", max_concurrent=1) is None
    assert zero.zcard(keys.active_limit("k")) == 1 and one.zcard(keys.active_limit("k")) == 0
    one.zadd(keys.pending("portrait"), {first: 1})  # the cap of a shard-1 queue is read on shard 1
    full = limiter.admit(key_id="k2", request_id=request_id_on(1), variant="portrait")
    assert full is not None and full.error_type == "queue_full"
