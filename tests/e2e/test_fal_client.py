"""The official Python fal-client (pinned 1.0.3), unchanged, against the gateway over HTTPS.

Each scenario runs the client in a fresh subprocess, because fal_client reads FAL_RUN_HOST and
FAL_QUEUE_RUN_HOST once, at import. The environment is what a team moving from fal sets:

    FAL_KEY=<id:secret>  FAL_RUN_HOST=<gateway>/run  FAL_QUEUE_RUN_HOST=<gateway>/queue  SSL_CERT_FILE=<our
    CA>

The TLS certificate comes from a CA the test generates. Real Redis, moto, worker and webhook processes.
"""

from __future__ import annotations

import json

import httpx
import pytest

from common.domain.signing import verify
from devstack.receiver import WebhookReceiver
from tests.helpers.fal_client import run_client
from tests.helpers.fal_verify import fal_documented_verify
from tests.helpers.gateway import GatewayStack, start_gateway_stack
from tests.helpers.images import png_bytes
from tests.helpers.servers import FileServer


@pytest.fixture(scope="module")
def gs(redis_server, moto_endpoint, tmp_path_factory) -> GatewayStack:
    stack = start_gateway_stack(
        redis_server.port, moto_endpoint, tmp_path_factory.mktemp("fal-client"), tls=True
    )
    yield stack
    stack.close()


@pytest.mark.timeout(240)
def test_submit_status_result(gs):
    got = run_client(
        gs,
        """
        handle = fal_client.submit(APP, arguments={"image_url": IMAGE, "output_mask": True},
                                   start_timeout=120, hint="lane-1", priority="normal")
        seen = []
        while True:
            status = handle.status(with_logs=True)
            seen.append(type(status).__name__)
            if isinstance(status, Completed):
                break
            time.sleep(0.1)
        again = fal_client.status(APP, handle.request_id, with_logs=False)
        result = handle.get()
        out({"id": handle.request_id, "status_url": handle.status_url, "seen": seen,
             "logs": [entry["message"] for entry in status.logs], "metrics": status.metrics,
             "again": type(again).__name__, "result": result,
             "by_id": fal_client.result(APP, handle.request_id) == result})
    """,
    )
    assert got["status_url"].startswith(
        f"https://127.0.0.1:{gs.gateway.port}/queue/fal-ai/birefnet/requests/"
    )
    assert got["seen"][-1] == "Completed" and set(got["seen"]) <= {"Queued", "InProgress", "Completed"}
    assert "loading image" in got["logs"] and got["metrics"]["inference_time"] > 0
    assert got["again"] == "Completed" and got["by_id"]
    image, mask = got["result"]["image"], got["result"]["mask_image"]
    assert (image["width"], image["height"]) == (72, 40) and mask["content_type"] == "image/png"
    assert httpx.get(image["url"]).status_code == 200


@pytest.mark.timeout(240)
def test_subscribe_streams_worker_logs(gs):
    slow = FileServer({"/photo.png": (png_bytes((72, 40)), "image/png")}, delays={"/photo.png": 1.0})
    try:
        got = run_client(
            gs,
            f"""
            updates = []
            def on_update(status):
                updates.append({{"kind": type(status).__name__,
                                 "logs": [e["message"] for e in (getattr(status, "logs", None) or [])]}})
            enqueued = []
            result = fal_client.subscribe(APP, arguments={{"image_url": {slow.url("/photo.png")!r}}},
            with_logs=True,
                                          on_enqueue=enqueued.append, on_queue_update=on_update)
            out({{"updates": updates, "enqueued": enqueued, "result": result}})
        """,
        )
    finally:
        slow.stop()
    kinds = [u["kind"] for u in got["updates"]]
    assert kinds[-1] == "Completed" and "InProgress" in kinds and len(got["enqueued"]) == 1
    logs = [message for update in got["updates"] for message in update["logs"]]
    assert "loading image" in logs and any(m.startswith("inference ") for m in logs)
    assert "uploading" in logs, "the worker's log lines reach subscribe()'s callback"
    assert got["result"]["image"]["content_type"] == "image/png"


@pytest.mark.timeout(240)
def test_run_returns_output_and_422_raises(gs):
    got = run_client(
        gs,
        """
        result = fal_client.run(APP, arguments={"image_url": IMAGE, "sync_mode": True})
        try:
            fal_client.run("fal-ai/birefnet", arguments={"image_url": IMAGE, "model": "Fancy"})
            error = None
        except FalClientHTTPError as exc:
            error = {"status": exc.status_code, "message": exc.message,
                     "request_id": exc.response_headers.get("x-fal-request-id")}
        handle = fal_client.submit(APP, arguments={"image_url": NOT_AN_IMAGE})
        try:
            handle.get()
            failed = None
        except FalClientHTTPError as exc:
            failed = {"status": exc.status_code, "message": exc.message}
        out({"result": result, "error": error, "failed": failed})
    """,
    )
    assert got["result"]["image"]["url"].startswith("data:image/png;base64,")
    assert got["error"]["status"] == 422 and got["error"]["request_id"]
    assert "model" in json.dumps(got["error"]["message"])
    assert got["failed"]["status"] == 422 and "image_load_error" in json.dumps(got["failed"]["message"])


def test_cancel_queued_request(gs):
    got = run_client(
        gs,
        """
        handle = fal_client.submit(APP, arguments={"image_url": IMAGE, "model": "General Use (Heavy)"})
        before = handle.status()
        fal_client.cancel(APP, handle.request_id)
        after = handle.status()
        try:
            handle.cancel()
            again = "accepted"
        except FalClientHTTPError as exc:
            again = exc.status_code
        try:
            handle.get()
            result = None
        except FalClientHTTPError as exc:
            result = {"status": exc.status_code, "type": exc.error_type}
        out({"before": type(before).__name__, "position": getattr(before, "position", None),
             "after": type(after).__name__, "again": again, "result": result})
    """,
    )
    assert got["before"] == "Queued" and got["position"] == 0
    assert got["after"] == "Completed" and got["again"] == 400
    assert got["result"] == {"status": 499, "type": "client_cancelled"}


@pytest.mark.timeout(240)
def test_webhook_signature_verifies_with_jwks(gs):
    receiver = WebhookReceiver().start()
    try:
        got = run_client(
            gs,
            f"""
            handle = fal_client.submit(APP, arguments={{"image_url": IMAGE}}, webhook_url={receiver.url!r})
            out({{"id": handle.request_id, "result": handle.get()}})
        """,
        )
        (delivery,) = receiver.wait(1, timeout=60)
    finally:
        receiver.stop()
    body = delivery.json()
    assert body["request_id"] == got["id"] and body["status"] == "OK" and body["payload"] == got["result"]
    with gs.client(None) as client:
        jwks = client.get("/.well-known/jwks.json").json()
    assert fal_documented_verify(delivery.headers, delivery.body, jwks)  # fal's receiver recipe
    assert verify(delivery.headers, delivery.body, jwks)
    assert delivery.headers["X-Fal-Webhook-Request-Id"] == got["id"]


def test_uploads_through_both_python_repositories(gs):
    got = run_client(
        gs,
        f"""
        fal_client.client.REST_URL = "https://127.0.0.1:{gs.gateway.port}/rest"
        fal_client.client.CDN_URL = "https://127.0.0.1:{gs.gateway.port}"
        # Labelled as images: uploads of text/html (a page that would run on the gateway's origin) are
        # refused.
        v3 = fal_client.upload(b"<html>v3</html>", "image/png", file_name="page.html")
        legacy = fal_client.upload(b"<html>gcs</html>", "image/png", repository="fal")
        errors = []
        for url in (v3, legacy):
            try:
                fal_client.subscribe(APP, arguments={{"image_url": url}})
            except FalClientHTTPError as exc:
                errors.append(exc.message[0]["type"])
        out({{"v3": v3, "legacy": legacy, "errors": errors}})
    """,
    )
    assert httpx.get(got["v3"]).content == b"<html>v3</html>"
    assert httpx.get(got["legacy"]).content == b"<html>gcs</html>"
    assert got["errors"] == ["image_load_error", "image_load_error"], "the worker read both uploads"
