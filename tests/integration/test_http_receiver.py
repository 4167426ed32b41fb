"""`producer http` over real HTTP (uvicorn on loopback) with a real redis-server and moto S3."""

from __future__ import annotations

import httpx

from common.state.jobs import JobStore
from producer.http_receiver import create_app
from producer.intake import build_intake
from tests.helpers.metrics import sample
from tests.helpers.pipeline import minio_body, put, queued_specs
from tests.helpers.servers import serve
from tests.helpers.stack import Stack, wait_for


def test_minio_notification_becomes_one_job(stack: Stack):
    settings = stack.settings.model_copy(update={"producer_http_token": "s3cret"})
    etag = put(stack, "shots/a cat.png", {"output_mask": "true"})
    body = minio_body(settings.input_bucket, "shots/a cat.png", etag)
    auth = {"Authorization": "Bearer s3cret", "Content-Type": "application/json"}
    with serve(create_app(settings)) as url:
        first = httpx.post(f"{url}/s3-events", content=body, headers=auth)
        again = httpx.post(f"{url}/s3-events", content=body, headers=auth)  # MinIO retried: same job
    assert first.status_code == 200, first.text
    (request_id,) = first.json()["request_ids"]
    assert again.json()["request_ids"] == [request_id]
    specs = queued_specs(stack, "birefnet.general-light")
    assert {s["request_id"] for s in specs} == {request_id}
    assert specs[0]["image_url"] == f"s3://{settings.input_bucket}/shots/a cat.png"
    assert specs[0]["params"]["output_mask"] is True
    assert JobStore.from_url(settings.redis_url).get(request_id).status == "IN_QUEUE"


def test_auth_probes_bad_bodies_and_metrics(stack: Stack):
    settings = stack.settings.model_copy(update={"producer_http_token": "s3cret"})
    etag = put(stack, "notes/readme.txt")
    with serve(create_app(settings)) as url:
        body = minio_body(settings.input_bucket, "notes/readme.txt", etag)
        assert httpx.post(f"{url}/s3-events", content=body).status_code == 401
        assert (
            httpx.post(f"{url}/s3-events", content=body, headers={"Authorization": "Bearer nope"}).status_code
            == 401
        )
        auth = {"Authorization": "Bearer s3cret"}
        assert httpx.head(f"{url}/s3-events").status_code == 200  # MinIO's liveness probe
        ignored = httpx.post(f"{url}/s3-events", content=body, headers=auth)
        assert ignored.status_code == 200 and ignored.json()["request_ids"] == []
        bad = httpx.post(f"{url}/s3-events", content=b"{not json", headers=auth)
        assert bad.status_code == 400
        test_event = {"Service": "Amazon S3", "Event": "s3:TestEvent"}
        assert httpx.post(f"{url}/s3-events", json=test_event, headers=auth).json()["records"] == 0
        assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
        assert httpx.get(f"{url}/readyz").status_code == 200
        metrics = httpx.get(f"{url}/metrics").text
    assert sample(metrics, "birefnet_producer_events_total", source="http", outcome="ignored") >= 1
    assert sample(metrics, "birefnet_producer_events_total", source="http", outcome="malformed") >= 1
    assert sample(metrics, "birefnet_redis_up") == 1
    assert sample(metrics, "birefnet_queue_messages", variant="general-light") == 0
    assert no_jobs_queued(stack)


def no_jobs_queued(stack: Stack) -> bool:
    return queued_specs(stack, "birefnet.general-light") == []


def test_transient_failure_answers_503_and_the_retry_succeeds(stack: Stack):
    etag = put(stack, "later.png")
    body = minio_body(stack.settings.input_bucket, "later.png", etag)
    down = stack.settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    with serve(create_app(down, build_intake(down))) as url:
        failed = httpx.post(f"{url}/s3-events", content=body)
        assert httpx.get(f"{url}/readyz").status_code == 503
    assert failed.status_code == 503 and failed.headers["retry-after"] == "5"
    assert no_jobs_queued(stack), "nothing was enqueued"
    with serve(create_app(stack.settings)) as url:
        retried = httpx.post(f"{url}/s3-events", content=body)
    assert retried.status_code == 200 and len(retried.json()["request_ids"]) == 1
    wait_for(lambda: len(queued_specs(stack, "birefnet.general-light")) == 1, 5, "the job on its queue")
