"""Contract tests of the gateway over HTTP (httpx), one per point of docs/api.md or so.

Real parts: redis-server, moto, a `python -m worker` process for general-light (general-heavy has no
worker until the priority test starts one, so requests for it stay queued), the webhook deliverer
process, and the gateway on uvicorn. Requests that must finish fast use inputs that fail in the worker
before inference; only a few run the network.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import redis

from common.adapters.storage import uploads_prefix
from common.domain.signing import verify
from common.state import keys
from common.state.jobs import JobStore
from common.state.webhooks import list_attempts
from devstack.receiver import WebhookReceiver
from devstack.services import free_port
from tests.helpers.fal_verify import fal_documented_verify
from tests.helpers.gateway import ALICE, BOB, OPS, GatewayServer, GatewayStack, auth, start_gateway_stack
from tests.helpers.images import data_uri, png_bytes
from tests.helpers.servers import FileServer
from tests.helpers.stack import wait_for

V1 = "/queue/fal-ai/birefnet"
V2 = "/queue/fal-ai/birefnet/v2"
REQ = "/queue/fal-ai/birefnet/requests"
HEAVY = {"model": "General Use (Heavy)"}  # no worker serves it (until the priority test): stays queued
NOT_AN_IMAGE = data_uri(b"<html>not an image</html>", "text/html")
MAX_INPUT = 200_000


@pytest.fixture(scope="module")
def gs(redis_server, moto_endpoint, tmp_path_factory) -> GatewayStack:
    stack = start_gateway_stack(
        redis_server.port,
        moto_endpoint,
        tmp_path_factory.mktemp("gateway"),
        extra={"BIREFNET_MAX_INPUT_BYTES": str(MAX_INPUT), "BIREFNET_GATEWAY_SSE_PING_INTERVAL": "0.3"},
    )
    yield stack
    stack.close()


@pytest.fixture(scope="module")
def files() -> FileServer:
    server = FileServer(
        {
            "/cat.png": (png_bytes((80, 60)), "image/png"),
            "/slow.png": (png_bytes((80, 60)), "image/png"),
            "/page.html": (b"<html>hello</html>", "text/html"),
            "/big.png": (os.urandom(MAX_INPUT + 5000), "image/png"),
        },
        delays={"/slow.png": 2.0},
    )
    yield server
    server.stop()


@pytest.fixture
def alice(gs: GatewayStack) -> httpx.Client:
    with gs.client(ALICE) as client:
        yield client


@pytest.fixture
def bob(gs: GatewayStack) -> httpx.Client:
    with gs.client(BOB) as client:
        yield client


@pytest.fixture
def receiver() -> WebhookReceiver:
    hooks = WebhookReceiver().start()
    yield hooks
    hooks.stop()


def submit(client: httpx.Client, body: dict | None, path: str = V2, **kwargs) -> dict:
    response = client.post(path, json=body, **kwargs)
    assert response.status_code == 200, response.text
    return response.json()


def completed(gs: GatewayStack, request_id: str, credential: str = ALICE, timeout: float = 90) -> dict:
    return gs.wait_status(request_id, "COMPLETED", credential, timeout)


def record(gs: GatewayStack, request_id: str):
    return JobStore.from_url(gs.settings.redis_url).get(request_id)


def sse_events(response: httpx.Response, blocks: list[str] | None = None) -> list[str]:
    """Raw SSE blocks (`data: …` events and `: ping` comments) until the server closes the stream, appended
    to `blocks` as they come when given."""
    blocks, buffer = [] if blocks is None else blocks, ""
    for chunk in response.iter_text():
        buffer += chunk
        while "\n\n" in buffer:
            block, buffer = buffer.split("\n\n", 1)
            blocks.append(block)
    return blocks


# --- 1, 3, 11: submit shape, URLs, headers ---------------------------------------------------------
def test_submit_answers_fal_shape_with_absolute_urls(gs, alice):
    response = alice.post(V2, json={"image_url": NOT_AN_IMAGE, **HEAVY})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    rid = body["request_id"]
    assert uuid.UUID(rid).version == 4 and response.headers["x-fal-request-id"] == rid
    assert body["status"] == "IN_QUEUE" and body["gateway_request_id"] == rid
    assert isinstance(body["queue_position"], int)
    base = f"{gs.url}/queue/fal-ai/birefnet/requests/{rid}"  # v2 is dropped: one namespace
    assert (body["response_url"], body["status_url"], body["cancel_url"]) == (
        base,
        base + "/status",
        base + "/cancel",
    )
    # A missing body counts as {} (JS sends none): accepted, then the model's 422.
    empty = alice.post(V2)
    assert empty.status_code == 200
    assert alice.put(f"{REQ}/{rid}/cancel").status_code == 202


def test_public_urls_follow_forwarded_headers_and_config(gs, alice):
    body = submit(
        alice,
        {"image_url": NOT_AN_IMAGE, **HEAVY},
        headers={"x-forwarded-proto": "https", "x-forwarded-host": "api.example:8443"},
    )
    assert (
        body["status_url"]
        == f"https://api.example:8443/queue/fal-ai/birefnet/requests/{body['request_id']}/status"
    )
    alice.put(f"{REQ}/{body['request_id']}/cancel")
    configured = GatewayServer(
        gs.settings.model_copy(update={"gateway_public_url": "https://gw.example/"})
    ).start()
    try:
        with httpx.Client(base_url=configured.url, headers=auth(ALICE)) as client:
            body = submit(client, {"image_url": NOT_AN_IMAGE, **HEAVY})
            assert (
                body["response_url"]
                == f"https://gw.example/queue/fal-ai/birefnet/requests/{body['request_id']}"
            )
            client.put(f"{REQ}/{body['request_id']}/cancel")
    finally:
        configured.stop()


# --- 4, 5, 6, 7, 15, 18: a real job from queue to result, polled and streamed -----------------------
@pytest.mark.timeout(240)
def test_job_lifecycle_status_logs_stream_and_result(gs, alice, files):
    lifecycle = {"x-fal-object-lifecycle-preference": json.dumps({"expiration_duration_seconds": 900})}
    body = submit(alice, {"image_url": files.url("/slow.png"), "output_mask": True}, headers=lifecycle)
    rid = body["request_id"]
    booked = redis.Redis.from_url(gs.settings.redis_url).zscore(keys.OUTPUTS, f"req:{rid}")
    assert booked == pytest.approx(record(gs, rid).created_at + 900), "its files' deletion booked with it"
    events: list[str] = []

    def stream() -> None:
        with (
            gs.client(ALICE) as client,
            client.stream("GET", f"{REQ}/{rid}/status/stream?logs=1") as response,
        ):
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            assert response.headers["x-fal-request-id"] == rid
            events.extend(sse_events(response))

    streamer = threading.Thread(target=stream)
    streamer.start()

    early = alice.get(f"{REQ}/{rid}/status")
    assert early.status_code == 202 and early.json()["status"] in ("IN_QUEUE", "IN_PROGRESS")
    assert early.json()["logs"] is None and early.json()["metrics"] == {}
    if early.json()["status"] == "IN_QUEUE":
        assert isinstance(early.json()["queue_position"], int)
    too_soon = alice.get(f"{REQ}/{rid}")
    assert too_soon.status_code == 400 and too_soon.headers["x-fal-error-type"] == "bad_request"
    assert too_soon.json() == {"detail": "Request is still in progress", "error_type": "bad_request"}

    in_progress = gs.wait_status(rid, "IN_PROGRESS", timeout=60)
    assert "queue_position" not in in_progress and in_progress["logs"] is None
    done = completed(gs, rid)
    assert done["metrics"]["inference_time"] > 0 and "error" not in done
    final = alice.get(f"{REQ}/{rid}/status", params={"logs": "true"})
    assert final.status_code == 200
    messages = [entry["message"] for entry in final.json()["logs"]]
    assert messages[0] == "loading image" and any(m.startswith("inference ") for m in messages)
    assert "uploading" in messages
    assert {e["level"] for e in final.json()["logs"]} <= {
        "INFO",
        "WARN",
        "ERROR",
        "DEBUG",
        "STDOUT",
        "STDERR",
    }
    assert alice.get(f"{REQ}/{rid}/status?logs=1").json()["logs"] == final.json()["logs"]

    result = alice.get(f"{REQ}/{rid}")
    assert result.status_code == 200 and result.headers["x-fal-request-id"] == rid
    output = result.json()
    for name in ("image", "mask_image"):
        item = output[name]
        assert set(item) >= {"url", "content_type", "file_name", "file_size", "width", "height"}
        assert (item["width"], item["height"]) == (80, 60) and item["content_type"] == "image/png"
        fetched = httpx.get(item["url"])
        assert fetched.status_code == 200 and len(fetched.content) == item["file_size"]
        assert parse_qs(urlsplit(item["url"]).query)["X-Amz-Expires"] == ["900"], "lifecycle preference"

    streamer.join(timeout=30)
    assert not streamer.is_alive(), "the stream closes after COMPLETED"
    data = [json.loads(block[len("data: ") :]) for block in events if block.startswith("data: ")]
    assert data[-1]["status"] == "COMPLETED" and data[-1]["metrics"]["inference_time"] > 0
    assert [d["status"] for d in data] == sorted(
        (d["status"] for d in data), key=["IN_QUEUE", "IN_PROGRESS", "COMPLETED"].index
    )
    streamed_logs = [entry for d in data for entry in d["logs"]]
    assert streamed_logs == final.json()["logs"][: len(streamed_logs)], "deltas add up, no repeats"
    assert "loading image" in [e["message"] for e in streamed_logs]


def test_stream_pings_while_queued_and_closes_when_cancelled(gs, alice):
    rid = submit(alice, {"image_url": NOT_AN_IMAGE, **HEAVY})["request_id"]
    blocks: list[str] = []

    def stream() -> None:
        with gs.client(ALICE) as client, client.stream("GET", f"{REQ}/{rid}/status/stream") as response:
            blocks.extend(sse_events(response))

    streamer = threading.Thread(target=stream)
    streamer.start()
    time.sleep(1.2)  # several ping intervals (0.3 s in this module)
    assert alice.put(f"{REQ}/{rid}/cancel").status_code == 202
    streamer.join(timeout=10)
    assert not streamer.is_alive()
    assert blocks.count(": ping") >= 2
    data = [json.loads(b[6:]) for b in blocks if b.startswith("data: ")]
    assert data[0]["status"] == "IN_QUEUE" and data[0]["logs"] is None and "queue_position" in data[0]
    assert data[-1]["status"] == "COMPLETED" and data[-1]["error_type"] == "client_cancelled"


def test_stream_of_a_queued_job_follows_its_position_without_the_other_jobs_notices(gs, alice):
    """Jobs nobody watches publish nothing: the queued job's stream re-reads its position on its own."""
    ahead = submit(alice, {"image_url": NOT_AN_IMAGE, **HEAVY})["request_id"]
    rid = submit(alice, {"image_url": NOT_AN_IMAGE, **HEAVY})["request_id"]
    store = JobStore.from_url(gs.settings.redis_url)
    blocks: list[str] = []

    def stream() -> None:
        with gs.client(ALICE) as client, client.stream("GET", f"{REQ}/{rid}/status/stream") as response:
            sse_events(response, blocks)

    streamer = threading.Thread(target=stream)
    streamer.start()
    time.sleep(0.5)
    assert store.redis.hget(keys.job(rid), "watched") == "1", "the stream marked the job it watches"
    assert store.redis.hget(keys.job(ahead), "watched") is None
    first = [json.loads(b[6:]) for b in blocks if b.startswith("data: ")][0]["queue_position"]
    claimed = store.claim(ahead, "general-heavy", "t", lease_seconds=30, max_attempts=3, worker="test")
    assert claimed.outcome == "claimed" and not claimed.watched
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        positions = [json.loads(b[6:])["queue_position"] for b in blocks if b.startswith("data: ")]
        if positions[-1] == first - 1:
            break
        time.sleep(0.1)
    assert positions[-1] == first - 1, positions
    store.complete(ahead, token="t", result={}, variant="general-heavy")
    assert alice.put(f"{REQ}/{rid}/cancel").status_code == 202
    streamer.join(timeout=10)
    assert not streamer.is_alive()


# --- 8, 14: validation and model-side errors --------------------------------------------------------
def result_of(
    gs: GatewayStack, client: httpx.Client, body: dict | None, path: str = V2
) -> tuple[dict, httpx.Response]:
    rid = submit(client, body, path)["request_id"]
    status = completed(gs, rid)
    return status, client.get(f"{REQ}/{rid}")


def test_invalid_input_completes_with_fastapi_422(gs, alice):
    status, result = result_of(gs, alice, {"image_url": "https://x.example/a.png", "model": "Fancy"}, V1)
    expected = "'General Use (Light)', 'General Use (Heavy)' or 'Portrait'"
    assert result.status_code == 422 and result.headers["content-type"] == "application/json"
    assert result.json() == {
        "detail": [
            {
                "type": "enum",
                "loc": ["body", "model"],
                "msg": f"Input should be {expected}",
                "input": "Fancy",
                "ctx": {"expected": expected},
            }
        ]
    }
    assert status["error"] == "Invalid status code: 422" and status["error_type"] == "enum"

    _, missing = result_of(gs, alice, {})
    assert missing.json()["detail"] == [
        {"type": "missing", "loc": ["body", "image_url"], "msg": "Field required", "input": {}}
    ]
    _, too_big = result_of(
        gs, alice, {"image_url": "https://x.example/a.png", "operating_resolution": "2304x2304"}
    )
    (item,) = too_big.json()["detail"]
    assert item["loc"] == ["body", "operating_resolution"] and "General Use (Dynamic)" in item["msg"]
    _, scheme = result_of(gs, alice, {"image_url": "ftp://x/a.png"})
    assert scheme.json()["detail"][0]["loc"] == ["body", "image_url"]
    _, bad_enum = result_of(gs, alice, {"image_url": NOT_AN_IMAGE, "output_format": "bmp"})
    assert bad_enum.json()["detail"][0]["type"] == "enum"

    # Sync run answers the 422 itself; bodies that are not JSON objects are refused at submit.
    run = alice.post("/run/fal-ai/birefnet/v2", json={"image_url": NOT_AN_IMAGE, "model": "Fancy"})
    assert run.status_code == 422 and run.json()["detail"][0]["loc"] == ["body", "model"]
    assert run.headers["x-fal-request-id"]
    malformed = alice.post(V2, content=b"{nope", headers={"content-type": "application/json"})
    assert malformed.status_code == 422 and malformed.json()["detail"][0]["type"] == "json_invalid"
    not_object = alice.post(V2, json=[1, 2])
    assert not_object.status_code == 422 and not_object.json()["detail"][0]["loc"] == ["body"]


def test_model_side_failures_complete_with_clear_errors(gs, alice, files):
    cases = {
        NOT_AN_IMAGE: "image_load_error",
        files.url("/page.html"): "image_load_error",
        files.url("/missing.png"): "file_download_error",
        files.url("/big.png"): "image_too_large",
        data_uri(os.urandom(MAX_INPUT + 1000)): "image_too_large",  # decoded at submit (large data URI)
    }
    ids = {submit(alice, {"image_url": url})["request_id"]: kind for url, kind in cases.items()}
    for rid, kind in ids.items():
        status = completed(gs, rid)
        assert status["error_type"] == kind and status["error"] == "Invalid status code: 422"
        result = alice.get(f"{REQ}/{rid}")
        assert result.status_code == 422
        (item,) = result.json()["detail"]
        assert item["type"] == kind and item["loc"] == ["body", "image_url"] and item["msg"]


# --- 12, 11: auth and isolation ---------------------------------------------------------------------
def test_auth_is_required_and_keys_are_isolated(gs, alice, bob):
    with gs.client(None) as anonymous:
        missing = anonymous.post(V2, json={"image_url": NOT_AN_IMAGE})
    assert missing.status_code == 401 and missing.headers["content-type"] == "application/json"
    assert "detail" in missing.json() and missing.headers["x-fal-request-id"]
    with gs.client("alice:wrong") as wrong:
        assert wrong.get(f"{REQ}/{uuid.uuid4()}/status").status_code == 401
    with gs.client(None, headers={"Authorization": "Bearer bob-secret"}) as token:  # bare sha256 token
        assert token.get(f"{REQ}/{uuid.uuid4()}/status").status_code == 404

    rid = submit(alice, {"image_url": NOT_AN_IMAGE, **HEAVY})["request_id"]
    assert alice.get(f"{REQ}/{rid}/status").status_code == 202
    for response in (
        bob.get(f"{REQ}/{rid}/status"),
        bob.get(f"{REQ}/{rid}"),
        bob.get(f"{REQ}/{rid}/status/stream"),
    ):
        assert response.status_code == 404 and response.json() == {"detail": "Request not found"}
    assert bob.put(f"{REQ}/{rid}/cancel").json() == {"status": "NOT_FOUND"}
    assert alice.get(f"{REQ}/{uuid.uuid4()}/status").status_code == 404
    assert alice.put(f"{REQ}/{rid}/cancel").status_code == 202


# --- 9: cancel ---------------------------------------------------------------------------------------
def test_cancel_queued_request_never_runs_and_fires_error_webhook(gs, alice, receiver):
    rid = submit(alice, {"image_url": NOT_AN_IMAGE, **HEAVY}, params={"fal_webhook": receiver.url})[
        "request_id"
    ]
    cancelled = alice.put(f"{REQ}/{rid}/cancel")
    assert cancelled.status_code == 202 and cancelled.json() == {"status": "CANCELLATION_REQUESTED"}
    status = alice.get(f"{REQ}/{rid}/status").json()
    assert status["status"] == "COMPLETED" and status["error_type"] == "client_cancelled"
    assert status["error"] == "Request was cancelled"
    result = alice.get(f"{REQ}/{rid}")
    assert result.status_code == 499 and result.headers["x-fal-error-type"] == "client_cancelled"
    again = alice.put(f"{REQ}/{rid}/cancel")
    assert again.status_code == 400 and again.json() == {"status": "ALREADY_COMPLETED"}
    unknown = alice.put(f"{REQ}/{uuid.uuid4()}/cancel")
    assert unknown.status_code == 404 and unknown.json() == {"status": "NOT_FOUND"}
    (hook,) = receiver.wait(1, timeout=30)
    assert hook.json()["status"] == "ERROR" and hook.json()["payload"]["error_type"] == "client_cancelled"
    assert record(gs, rid).started_at is None, "it never ran"


@pytest.mark.timeout(180)
def test_cancel_running_request_completes_as_cancelled(gs, alice, files):
    rid = submit(alice, {"image_url": files.url("/slow.png")})["request_id"]  # 2 s in "loading image"
    gs.wait_status(rid, "IN_PROGRESS", timeout=60)
    response = alice.put(f"{REQ}/{rid}/cancel")
    assert response.status_code == 202 and response.json() == {"status": "CANCELLATION_REQUESTED"}
    status = completed(gs, rid)
    assert status["error_type"] == "client_cancelled"
    assert alice.get(f"{REQ}/{rid}").status_code == 499


# --- 10, 13: sync run and URL conventions ----------------------------------------------------------
@pytest.mark.timeout(180)
def test_sync_run_on_root_path_returns_data_uris(gs, alice):
    response = alice.post(
        "/fal-ai/birefnet/v2/",
        json={"image_url": data_uri(png_bytes()), "sync_mode": True, "output_format": "webp"},
        timeout=150,
    )
    assert response.status_code == 200, response.text
    rid = response.headers["x-fal-request-id"]
    image = response.json()["image"]
    assert image["url"].startswith("data:image/webp;base64,") and image["content_type"] == "image/webp"
    assert response.json()["mask_image"] is None
    assert alice.get(f"{REQ}/{rid}").json() == response.json(), "the run is a request like any other"
    listing = s3(gs).list_objects_v2(
        Bucket=gs.settings.output_bucket, Prefix=f"{gs.settings.output_prefix}requests/{rid}/"
    )
    assert listing.get("KeyCount", 0) == 0, "sync_mode outputs are not stored"


def test_host_and_path_conventions(gs, alice):
    queue_host = {"host": "queue.api.example"}
    body = submit(alice, {"image_url": NOT_AN_IMAGE, **HEAVY}, path="/fal-ai/birefnet/v2", headers=queue_host)
    rid = body["request_id"]
    assert body["status"] == "IN_QUEUE" and body["status_url"].startswith("http://queue.api.example/queue/")
    for path in (
        f"/fal-ai/birefnet/requests/{rid}/status/",
        f"{REQ}/{rid}/status/",
        f"/queue/fal-ai/birefnet/v2/requests/{rid}/status",
        f"/fal-ai/birefnet/v2/requests/{rid}/status",
    ):
        response = alice.get(path, headers=queue_host if not path.startswith("/queue") else {})
        assert response.status_code == 202, path
    unknown = alice.post("/queue/fal-ai/birefnet/v3", json={})
    assert unknown.status_code == 404 and unknown.json() == {"detail": "Application not found"}
    assert alice.post("/fal-ai/flux/dev", json={}).status_code == 404
    wrong_method = alice.get("/run/fal-ai/birefnet/v2")
    assert wrong_method.status_code == 405 and wrong_method.headers["content-type"] == "application/json"
    assert alice.post("/run/fal-ai/birefnet/stream", json={}).status_code == 404
    assert alice.get(f"{REQ}/{rid}/status", headers={"content-type": "application/json"}).status_code == 202
    alice.put(f"{REQ}/{rid}/cancel")


def test_js_proxy_route(gs, alice, receiver):
    target = f"https://queue.fal.run/fal-ai/birefnet/v2?fal_webhook={receiver.url}"
    body = submit(alice, {"model": "Fancy"}, path="/api/fal/proxy", headers={"x-fal-target-url": target})
    rid = body["request_id"]
    status = alice.get(
        "/api/fal/proxy",
        headers={"x-fal-target-url": f"https://queue.fal.run/fal-ai/birefnet/requests/{rid}/status?logs=1"},
    )
    assert status.status_code in (200, 202) and status.json()["request_id"] == rid
    assert status.headers["x-fal-request-id"] == rid
    (hook,) = receiver.wait(1, timeout=30)
    assert hook.json()["request_id"] == rid and hook.json()["status"] == "ERROR"
    for headers in (
        {},
        {"x-fal-target-url": "https://evil.example/fal-ai/birefnet"},
        {"x-fal-target-url": "not a url"},
    ):
        refused = alice.post("/api/fal/proxy", json={}, headers=headers)
        assert refused.status_code == 400 and refused.headers["content-type"] == "application/json"


def test_cors_preflight_and_exposed_headers(gs):
    with gs.client(None) as client:
        preflight = client.options(
            "/api/fal/proxy",
            headers={
                "origin": "https://app.example",
                "access-control-request-method": "PUT",
                "access-control-request-headers": (
                    "authorization, content-type, x-fal-target-url, x-fal-queue-priority"
                ),
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] in ("*", "https://app.example")
        assert "PUT" in preflight.headers["access-control-allow-methods"]
        allowed = preflight.headers["access-control-allow-headers"].lower()
        assert "x-fal-target-url" in allowed and "authorization" in allowed
        simple = client.get(
            f"{REQ}/{uuid.uuid4()}/status", headers={"origin": "https://app.example", **auth(ALICE)}
        )
        assert simple.status_code == 404
        assert "x-fal-request-id" in simple.headers["access-control-expose-headers"].lower()


# --- 20: timeout, priority, lifecycle ---------------------------------------------------------------
def test_request_timeout_expires_queued_request(gs, alice):
    rid = submit(alice, {"image_url": NOT_AN_IMAGE, **HEAVY}, headers={"X-Fal-Request-Timeout": "1.5"})[
        "request_id"
    ]
    status = completed(gs, rid, timeout=15)
    assert status["error_type"] == "request_timeout"
    result = alice.get(f"{REQ}/{rid}")
    assert result.status_code == 504 and result.json()["error_type"] == "request_timeout"
    assert result.headers["x-fal-request-timeout-type"] == "user"
    assert result.headers["x-fal-error-type"] == "request_timeout"
    bad = alice.post(V2, json={"image_url": NOT_AN_IMAGE}, headers={"X-Fal-Request-Timeout": "soon"})
    assert bad.status_code == 400 and bad.json()["error_type"] == "bad_request"


@pytest.mark.timeout(240)
def test_low_priority_runs_after_normal_and_queue_positions(gs, alice):
    order = ["low", "normal", "low", "normal", "normal"]
    answers = [
        submit(alice, {"image_url": NOT_AN_IMAGE, **HEAVY}, headers={"X-Fal-Queue-Priority": p})
        for p in order
    ]
    ids = [answer["request_id"] for answer in answers]
    # Each submit answers its position when queued: a normal job goes ahead of the waiting low ones.
    at_submit = [answer["queue_position"] - answers[0]["queue_position"] for answer in answers]
    assert at_submit == [0, 0, 2, 1, 2], at_submit
    positions = {rid: alice.get(f"{REQ}/{rid}/status").json()["queue_position"] for rid in ids}
    normal = [rid for rid, p in zip(ids, order, strict=True) if p == "normal"]
    low = [rid for rid, p in zip(ids, order, strict=True) if p == "low"]
    ranked = sorted(ids, key=positions.get)
    assert ranked[-2:] == low and ranked[:3] == normal, "low after normal, each in submission order"
    assert sorted(positions.values()) == sorted(set(positions.values()))

    worker = gs.stack.start_worker("general-heavy", name="worker-heavy")
    try:
        starts = {rid: None for rid in ids}
        for rid in ids:
            completed(gs, rid, timeout=60)
            starts[rid] = record(gs, rid).started_at
        assert max(starts[r] for r in normal) < min(starts[r] for r in low), starts
    finally:
        worker.terminate()
        worker.wait(timeout=20)


@pytest.mark.timeout(240)
def test_no_retry_request_fails_instead_of_running_again(gs, alice):
    no_retry = submit(alice, {"image_url": NOT_AN_IMAGE, **HEAVY}, headers={"x-fal-no-retry": "1"})[
        "request_id"
    ]
    retried = submit(alice, {"image_url": NOT_AN_IMAGE, **HEAVY}, headers={"x-fal-no-retry": "0"})[
        "request_id"
    ]
    # A worker takes both and dies: the leases it leaves run out with no result (what kill -9 leaves).
    store = JobStore.from_url(gs.settings.redis_url)
    for rid in (no_retry, retried):
        assert (
            store.claim(
                rid, "general-heavy", "ghost", lease_seconds=0.5, max_attempts=3, worker="ghost"
            ).outcome
            == "claimed"
        )
    time.sleep(0.6)

    worker = gs.stack.start_worker("general-heavy", name="worker-heavy-no-retry")
    try:
        completed(gs, no_retry, timeout=60)
        completed(gs, retried, timeout=60)
    finally:
        worker.terminate()
        worker.wait(timeout=20)
    failed = alice.get(f"{REQ}/{no_retry}")
    assert failed.status_code == 503 and failed.json()["error_type"] == "runner_disconnected"
    assert "x-fal-no-retry" in failed.json()["detail"]
    assert (
        record(gs, no_retry).started_at is not None and record(gs, no_retry).attempts == 2
    )  # the 2nd refused
    # Without the header the same job runs again, to its own outcome (this input is not an image: 422).
    again = alice.get(f"{REQ}/{retried}")
    assert again.status_code == 422, again.text
    assert record(gs, retried).attempts == 2


# --- 21: retention, limits -----------------------------------------------------------------------------
def test_results_expire_after_retention_and_body_limit(gs):
    short = GatewayServer(
        gs.settings.model_copy(update={"gateway_result_retention": 1, "gateway_max_body_bytes": 4096})
    ).start()
    try:
        with httpx.Client(base_url=short.url, headers=auth(ALICE)) as client:
            rid = submit(client, {"model": "Fancy"})["request_id"]
            assert client.get(f"{REQ}/{rid}").status_code == 422
            time.sleep(2.1)
            assert client.get(f"{REQ}/{rid}/status").status_code == 404
            assert client.get(f"{REQ}/{rid}").json() == {"detail": "Request not found"}
            big = client.post(V2, json={"image_url": "data:image/png;base64," + "A" * 8000})
            assert big.status_code == 413 and big.json()["error_type"] == "request_too_large"
    finally:
        short.stop()


# --- 14, 23: inputs from S3, uploads, gateway-served files --------------------------------------------
def s3(gs: GatewayStack):
    import boto3

    return boto3.client("s3", endpoint_url=gs.settings.s3_endpoint_url, region_name=gs.settings.aws_region)


def test_s3_inputs_follow_each_keys_permissions(gs, alice, bob):
    bucket = gs.settings.input_bucket
    s3(gs).put_object(Bucket=bucket, Key="alice/page.html", Body=b"<html/>")
    allowed = submit(alice, {"image_url": f"s3://{bucket}/alice/page.html"})["request_id"]
    denied = submit(alice, {"image_url": f"s3://{bucket}/carol/page.html"})["request_id"]
    bobs = submit(bob, {"image_url": f"s3://{bucket}/alice/page.html"})["request_id"]
    assert completed(gs, allowed)["error_type"] == "image_load_error", "read, then found not to be an image"
    for rid, credential in ((denied, ALICE), (bobs, BOB)):
        status = completed(gs, rid, credential)
        assert status["error_type"] == "file_download_error"
        with gs.client(credential) as client:
            assert "may not read" in client.get(f"{REQ}/{rid}").json()["detail"][0]["msg"]


def test_upload_initiate_put_and_use_as_input(gs, alice, bob):
    initiated = alice.post(
        "/rest/storage/upload/initiate?storage_type=fal-cdn-v3",
        json={"content_type": "image/png", "file_name": "my page.html"},
    )
    assert initiated.status_code == 200
    urls = initiated.json()
    # (Uploads take input image types only: text/html here once let a page run on the gateway's origin.)
    put = httpx.put(
        urls["upload_url"], content=b"<html>uploaded</html>", headers={"content-type": "image/png"}
    )
    assert put.status_code == 200
    assert httpx.get(urls["file_url"]).content == b"<html>uploaded</html>"
    rid = submit(alice, {"image_url": urls["file_url"]})["request_id"]
    assert completed(gs, rid)["error_type"] == "image_load_error", "downloaded, then found not to be an image"

    key = urlsplit(urls["upload_url"]).path.split("/", 2)[2]
    assert key.startswith(uploads_prefix(gs.settings, "alice"))
    as_s3 = f"s3://{gs.settings.output_bucket}/{key}"
    assert (
        completed(gs, submit(alice, {"image_url": as_s3})["request_id"])["error_type"] == "image_load_error"
    )
    theirs = submit(bob, {"image_url": as_s3})["request_id"]
    assert completed(gs, theirs, BOB)["error_type"] == "file_download_error", "uploads are per key"
    assert alice.post("/rest/storage/upload/initiate", json={}).status_code == 200
    with gs.client(None) as anonymous:
        assert anonymous.post("/rest/storage/upload/initiate", json={}).status_code == 401


def test_gateway_served_files_and_retention(gs):
    port = free_port()
    server = GatewayServer(
        gs.settings.model_copy(
            update={
                "gateway_output_urls": "gateway",
                "gateway_signing_secret": "s3cret",
                "gateway_public_url": f"http://127.0.0.1:{port}",
            }
        ),
        port=port,
    ).start()
    try:
        with httpx.Client(base_url=server.url, headers=auth(ALICE)) as client:
            token = client.post("/rest/storage/auth/token?storage_type=fal-cdn-v3", json={}).json()
            assert token["token_type"] == "Bearer" and token["expires_at"]
            uploaded = httpx.post(
                f"{server.url}/files/upload",
                content=b"<html>v3</html>",
                headers={
                    "authorization": f"Bearer {token['token']}",
                    "content-type": "image/png",  # text/html: 415 now
                    "x-fal-file-name": "v3.html",
                    "x-fal-object-lifecycle": json.dumps({"expiration_duration_seconds": 2}),
                },
            )
            assert uploaded.status_code == 200, uploaded.text
            url = uploaded.json()["access_url"]
            assert url.startswith(f"{server.url}/objects/")
            fetched = httpx.get(url)
            assert fetched.content == b"<html>v3</html>" and fetched.headers["content-type"] == "image/png"
            assert httpx.get(url.replace("sig=", "sig=x")).status_code == 404
            # Our own signed URL becomes an s3:// input the worker reads directly.
            rid = submit(client, {"image_url": url})["request_id"]
            assert record(gs, rid).spec.image_url.startswith(f"s3://{gs.settings.output_bucket}/")
            assert (
                httpx.post(
                    f"{server.url}/files/upload",
                    content=b"x",
                    headers={"authorization": "Bearer forged.token"},
                ).status_code
                == 401
            )
            key = urlsplit(url).path[len("/objects/") :]
            wait_for(
                lambda: (
                    not s3(gs).list_objects_v2(Bucket=gs.settings.output_bucket, Prefix=key).get("KeyCount")
                ),
                15,
                "the upload to be deleted after its retention",
            )
    finally:
        server.stop()


# --- 17: webhooks, JWKS, admin ---------------------------------------------------------------------
def test_webhook_is_signed_retried_and_failures_listed(gs, alice, receiver):
    jwks = httpx.get(f"{gs.url}/.well-known/jwks.json").json()
    assert len(jwks["keys"]) == 2 and all(k["kty"] == "OKP" and k["crv"] == "Ed25519" for k in jwks["keys"])

    receiver.status_codes = [500, 503]  # two failures, then delivered on the second retry
    rid = submit(alice, {"model": "Fancy"}, params={"fal_webhook": receiver.url})["request_id"]
    deliveries = receiver.wait(3, timeout=30)
    last = deliveries[-1]
    assert verify(last.headers, last.body, jwks)
    assert fal_documented_verify(last.headers, last.body, jwks), "fal's documented verifier, against our JWKS"
    assert last.headers["X-Fal-Webhook-User-Id"] == "user-alice"
    assert last.json() == {
        "request_id": rid,
        "gateway_request_id": rid,
        "status": "ERROR",
        "error": "Invalid status code: 422",
        "payload": last.json()["payload"],
    }
    assert ["body", "model"] in [item["loc"] for item in last.json()["payload"]["detail"]]
    assert {d.json()["request_id"] for d in deliveries} == {rid}
    store = JobStore.from_url(gs.settings.redis_url)
    wait_for(lambda: len(list_attempts(store, rid)) == 3, 10, "three recorded attempts")
    assert [a["ok"] for a in list_attempts(store, rid)] == [False, False, True]

    receiver.status_codes = [500] * 4  # the first attempt and all 3 retries fail
    failing = submit(alice, {"model": "Fancy"}, params={"fal_webhook": receiver.url})["request_id"]
    receiver.wait(3 + 4, timeout=30)
    with gs.client(OPS) as ops:
        listed = wait_for(
            lambda: [
                f for f in ops.get("/admin/webhooks/failed").json()["failed"] if f["request_id"] == failing
            ],
            15,
            "the failure to be listed",
        )
    assert len(listed[0]["attempts"]) == 4 and listed[0]["webhook_url"] == receiver.url
    assert alice.get("/admin/webhooks/failed").status_code == 403
    assert not verify(
        {**last.headers, "X-Fal-Webhook-Timestamp": str(int(time.time()) - 600)}, last.body, jwks
    )


def test_webhook_url_must_be_http(alice):
    response = alice.post(V2, json={"image_url": NOT_AN_IMAGE}, params={"fal_webhook": "ftp://x/y"})
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["query", "fal_webhook"]


# --- OpenAPI -----------------------------------------------------------------------------------------
def test_openapi_matches_the_routes_served(gs, alice):
    spec = httpx.get(f"{gs.url}/openapi.json").json()
    from openapi_spec_validator import validate  # installed with schemathesis (dev extra)

    validate(spec)
    schemas = spec["components"]["schemas"]
    assert schemas["BiRefNetV2Input"]["required"] == ["image_url"]
    v2_models = schemas[schemas["BiRefNetV2Input"]["properties"]["model"]["$ref"].rsplit("/", 1)[1]]["enum"]
    assert v2_models == gs.settings.variants.model_names("v2")
    submit_op = spec["paths"]["/queue/fal-ai/birefnet/v2"]["post"]
    assert submit_op["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/BiRefNetV2Input"
    )
    assert "202" in spec["paths"]["/queue/fal-ai/birefnet/requests/{request_id}/status"]["get"]["responses"]
    rid = str(uuid.uuid4())
    for path, methods in spec["paths"].items():
        concrete = path.replace("{request_id}", rid).replace("{key}", "nothing")
        for method in methods:
            response = alice.request(method.upper(), concrete, json={} if method in ("post", "put") else None)
            assert response.status_code not in (405, 500), (method, path, response.text)
            if response.status_code == 404:
                assert response.json().get("detail") != "Application not found", (method, path)


def test_health_and_metrics(gs):
    with gs.client(None) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/metrics").status_code == 401, "metrics on the API port need the admin key"
    with gs.client(ALICE) as client:
        assert client.get("/metrics").status_code == 403
    with gs.client(OPS) as client:
        metrics = client.get("/metrics")
    assert metrics.status_code == 200 and "birefnet_queue_waiting_jobs" in metrics.text


def test_redis_is_the_only_state(gs):
    """Nothing the gateway needs lives in its process: a second instance sees the same requests."""
    other = GatewayServer(gs.settings).start()
    try:
        with gs.client(ALICE) as client:
            rid = submit(client, {"image_url": NOT_AN_IMAGE, **HEAVY})["request_id"]
        with httpx.Client(base_url=other.url, headers=auth(ALICE)) as client:
            assert client.get(f"{REQ}/{rid}/status").json()["status"] == "IN_QUEUE"
            assert client.put(f"{REQ}/{rid}/cancel").status_code == 202
        assert redis.Redis.from_url(gs.settings.redis_url).hget(keys.job(rid), "status") == b"COMPLETED"
    finally:
        other.stop()
