"""Hostile input never makes the gateway fail: every reported case, and a table of
hand-written attacks (huge and malformed bodies, invalid UTF-8, duplicate keys, lying Content-Type, path
traversal, very long ids, every method on every route). Each gets a clear 4xx in fal's shapes, in valid
JSON, naming the field; nothing is logged as an unhandled error.

Real parts: redis-server, moto S3, the gateway on uvicorn in this process (so its log records are visible
here). No worker runs: requests that pass validation stay queued.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import uuid

import httpx
import pytest
import redis

from common.adapters.storage import uploads_prefix
from tests.helpers.gateway import ALICE, BOB, OPS, GatewayServer, GatewayStack, auth, start_gateway_stack
from tests.helpers.stack import wait_for

V1, V2 = "/queue/fal-ai/birefnet", "/queue/fal-ai/birefnet/v2"
RUN1, RUN2 = "/run/fal-ai/birefnet", "/run/fal-ai/birefnet/v2"
REQ = "/queue/fal-ai/birefnet/requests"
INITIATE, FILES = "/rest/storage/upload/initiate", "/files/upload"
PROXY = "/api/fal/proxy"
SUBMITS = (V1, V2, RUN1, RUN2)
MAX_BODY = 1_000_000
FAIL_LIMIT = 5
DEEP_ARRAY = b"[" * 1000 + b"]" * 1000
DEEP_OBJECT = b'{"a":' * 1000 + b"1" + b"}" * 1000
E_ACUTE = "\u00e9"
GOOD = {"image_url": "https://example.com/cat.png", "model": "General Use (Heavy)"}


def strict_json(text: str):
    """json.loads refusing NaN/Infinity: what every fal client's parser (JS JSON.parse) accepts."""

    def refuse(name: str):
        raise ValueError(f"{name} in a response body")

    return json.loads(text, parse_constant=refuse)


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def gs(redis_server, moto_endpoint, tmp_path_factory) -> GatewayStack:
    stack = start_gateway_stack(
        redis_server.port,
        moto_endpoint,
        tmp_path_factory.mktemp("hostile"),
        workers=(),
        webhooks=False,
        extra={
            "BIREFNET_GATEWAY_MAX_BODY_BYTES": str(MAX_BODY),
            "BIREFNET_GATEWAY_AUTH_FAIL_LIMIT": str(FAIL_LIMIT),
        },
    )
    yield stack
    stack.close()


@pytest.fixture(scope="module")
def gateway_log():
    records = Records()
    logger = logging.getLogger("gateway")
    level = logger.level
    logger.addHandler(records)
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(records)
    logger.setLevel(level)


@pytest.fixture
def alice(gs: GatewayStack) -> httpx.Client:
    with gs.client(ALICE) as client:
        yield client


def error_body(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, (response.status_code, response.text[:500])
    assert response.headers["content-type"].startswith("application/json"), response.headers
    return strict_json(response.text)


def body_error(response: httpx.Response) -> dict:
    """The single item of a 422 detail list."""
    (item,) = error_body(response, 422)["detail"]
    return item


# --- the repros ----------------------------------------------------------------------------
@pytest.mark.parametrize("body", [DEEP_ARRAY, DEEP_OBJECT], ids=["arrays", "objects"])
def test_deeply_nested_bodies_are_a_422_on_every_json_route(alice, body):
    for path in SUBMITS:
        item = body_error(alice.post(path, content=body, headers={"content-type": "application/json"}))
        assert item["type"] == "json_invalid" and "nested deeper" in item["ctx"]["error"], item
    proxied = alice.post(
        PROXY, content=body, headers={"x-fal-target-url": "https://queue.fal.run/fal-ai/birefnet"}
    )
    assert body_error(proxied)["type"] == "json_invalid"
    assert body_error(alice.post(INITIATE, content=body))["type"] == "json_invalid"


@pytest.mark.parametrize(
    ("raw", "loc"),
    [
        (b'{"image_url": "\\ud800"}', ["body", "image_url"]),
        (b'{"image_url": "https://example.com/a\\udfff.png"}', ["body", "image_url"]),
        (b'{"image_url": "s3://bucket/files/\\udc00/x.png"}', ["body", "image_url"]),
        (b'{"image_url": "https://example.com/a.png", "\\ud83d": 1}', ["body"]),
    ],
)
def test_lone_surrogates_are_a_422_naming_the_field(alice, raw, loc):
    for path in SUBMITS:
        item = body_error(alice.post(path, content=raw))
        assert item["loc"] == loc and "surrogate" in item["ctx"]["error"], item


def test_lone_surrogate_in_upload_content_type(alice):
    item = body_error(alice.post(INITIATE, content=b'{"content_type": "image/\\ud800png"}'))
    assert item["loc"] == ["body", "content_type"], item
    item = body_error(alice.post(INITIATE, json={"content_type": "not a mime type"}))
    assert item["loc"] == ["body", "content_type"] and item["type"] == "string_pattern_mismatch", item


LIFECYCLES = [
    '{"expiration_duration_seconds": Infinity}',
    '{"expiration_duration_seconds": 1e400}',
    '{"expiration_duration_seconds": NaN}',
    '{"a":' * 200 + "1" + "}" * 200,
    "[" * 1000,
    '{"expiration_duration_seconds": "soon"}',
    "not json",
]


@pytest.mark.parametrize(
    "value", LIFECYCLES, ids=["inf", "1e400", "nan", "deep", "deep-array", "string", "text"]
)
def test_lifecycle_headers_are_a_400_naming_the_header(alice, value):
    header = {"x-fal-object-lifecycle-preference": value}
    for path in SUBMITS:
        body = error_body(alice.post(path, json=GOOD, headers=header), 400)
        assert "x-fal-object-lifecycle-preference" in body["detail"] and body["error_type"] == "bad_request"
    assert (
        "x-fal-object-lifecycle-preference"
        in error_body(alice.post(INITIATE, json={}, headers=header), 400)["detail"]
    )
    upload = alice.post(FILES, content=b"bytes", headers={"X-Fal-Object-Lifecycle": value})
    assert "X-Fal-Object-Lifecycle" in error_body(upload, 400)["detail"]
    upload = alice.post(FILES, content=b"bytes", headers=header)
    assert "x-fal-object-lifecycle-preference" in error_body(upload, 400)["detail"]


@pytest.mark.parametrize(
    "raw",
    [
        b'{"image_url": NaN}',
        b'{"image_url": "https://e.x/a.png", "output_mask": Infinity}',
        b'{"image_url": "https://e.x/a.png", "output_mask": -Infinity}',
        b'{"image_url": "https://e.x/a.png", "output_mask": 1e999}',
    ],
)
def test_nan_and_infinity_are_refused_and_never_echoed(gs, alice, raw):
    jobs = redis.Redis.from_url(gs.settings.redis_url)
    before = len(jobs.keys("birefnet:job:*"))
    for path in SUBMITS:
        response = alice.post(path, content=raw)
        item = body_error(response)  # the 422 itself is strict JSON (no bare NaN)
        assert item["type"] == "json_invalid"
        assert re.search(r"(NaN|Infinity) is not valid JSON|out of range", item["ctx"]["error"]), item
    # Refused at submit: no request (and so no stored result) carries the text.
    assert len(jobs.keys("birefnet:job:*")) == before


def test_client_disconnecting_mid_body_is_not_an_unhandled_error(gs, gateway_log):
    before = len(gateway_log.messages)
    for path in (V2, INITIATE, FILES):
        with socket.create_connection(("127.0.0.1", gs.gateway.port), timeout=10) as sock:
            sock.sendall(
                f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Key {ALICE}\r\n"
                "Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n".encode()
                + b'{"image_url"'
            )
        # The gateway sees the hang-up; it answers the next caller as before.
    wait_for(
        lambda: any("disconnected" in m for m in gateway_log.messages[before:]), 30, "the disconnect logged"
    )
    assert not [m for m in gateway_log.messages[before:] if "unhandled" in m], gateway_log.messages[before:]
    assert httpx.get(f"{gs.url}/healthz").status_code == 200


def test_dot_segments_in_s3_keys_are_refused_before_prefix_checks(gs, alice):
    own = uploads_prefix(gs.settings, "alice")
    other = f"{gs.settings.output_prefix}requests/{uuid.uuid4()}/image.png"
    bucket = gs.settings.output_bucket
    for key in (f"{own}../../{other}", f"{own}x/%2e%2e/%2E%2E/../{other}", f"{own}./a.png"):
        item = body_error(alice.post(RUN2, json={"image_url": f"s3://{bucket}/{key}"}))
        assert item["loc"] == ["body", "image_url"] and "'..'" in item["msg"], item
    # Queued the same way: the request completes at once with that 422.
    rid = alice.post(V2, json={"image_url": f"s3://{bucket}/{own}../../{other}"}).json()["request_id"]
    gs.wait_status(rid, "COMPLETED")
    assert "'..'" in body_error(alice.get(f"{REQ}/{rid}"))["msg"]


# --- schema and server agree -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def spec(gs: GatewayStack) -> dict:
    return httpx.get(f"{gs.url}/openapi.json").json()


def test_webhook_pattern_is_the_servers(alice, spec):
    (param,) = [p for p in spec["paths"][V2]["post"]["parameters"] if p["name"] == "fal_webhook"]
    pattern = re.compile(param["schema"]["pattern"])
    for url in (
        "https://hooks.example/a\u0085b",
        "https://hooks.example/a b",
        "https://h.example/\u2028",
        "https://h.example/\ufeff",
    ):
        assert not pattern.search(url)
        assert body_error(alice.post(V2, json=GOOD, params={"fal_webhook": url}))["loc"] == [
            "query",
            "fal_webhook",
        ]
    assert pattern.search("https://hooks.example/caf\u00e9?x=1")
    assert (
        alice.post(V2, json=GOOD, params={"fal_webhook": "https://hooks.example/caf\u00e9"}).status_code
        == 200
    )


def test_timeout_header_empty_or_unbounded_is_a_400(alice, spec):
    (param,) = [p for p in spec["paths"][V2]["post"]["parameters"] if p["name"] == "X-Fal-Request-Timeout"]
    pattern, longest = re.compile(param["schema"]["pattern"]), param["schema"]["maxLength"]
    for value in ("", "9" * 400, "1e400", "inf", "30s"):
        assert not (pattern.search(value) and len(value) <= longest)
        body = error_body(alice.post(V2, json=GOOD, headers={"X-Fal-Request-Timeout": value}), 400)
        assert "X-Fal-Request-Timeout" in body["detail"]
    assert alice.post(V2, json=GOOD, headers={"X-Fal-Request-Timeout": "30.0"}).status_code == 200


def test_file_upload_needs_a_body_and_stores_only_real_content_types(alice, spec):
    assert spec["paths"][FILES]["post"]["requestBody"]["required"] is True
    assert "400" in spec["paths"][FILES]["post"]["responses"]
    assert "empty" in error_body(alice.post(FILES), 400)["detail"]
    for sent, stored in (
        ("imag\u00e9/png".encode("latin-1"), "application/octet-stream"),
        (b"*/*", "application/octet-stream"),
        (b"image/png", "image/png"),
    ):
        uploaded = alice.post(FILES, content=b"x", headers={"content-type": sent})
        assert uploaded.status_code == 200, uploaded.text
        assert httpx.get(uploaded.json()["access_url"]).headers["content-type"] == stored


def test_unsupported_methods_advertise_every_method_of_the_path(alice, spec):
    for path, methods in spec["paths"].items():
        concrete = path.replace("{request_id}", str(uuid.uuid4())).replace("{key}", "k")
        documented = {m.upper() for m in methods}
        for method in ("DELETE", "PATCH", "TRACE", *({"OPTIONS"} - documented)):
            response = alice.request(method, concrete)
            body = error_body(response, 405)
            assert body["detail"] == "Method Not Allowed"
            allowed = {m.strip() for m in response.headers["allow"].split(",")}
            assert documented <= allowed, (method, path, allowed)


def test_every_operation_documents_its_error_answers(spec):
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            codes = set(operation["responses"])
            assert {"500", "503"} <= codes, (method, path)
            if method in ("post", "put"):
                assert "413" in codes, (method, path)
            if "security" in operation:
                assert "429" in codes, (method, path)
            for code in ("413", "429", "500", "503"):
                if code in codes:
                    ref = operation["responses"][code]["content"]["application/json"]["schema"]["$ref"]
                    assert ref.endswith("/ErrorBody")


def test_too_large_body_is_a_documented_413(alice):
    body = error_body(alice.post(V2, content=b"x" * (MAX_BODY + 1)), 413)
    assert body["error_type"] == "request_too_large"

    def chunks():
        for _ in range(MAX_BODY // 65536 + 2):
            yield b"a" * 65536

    assert error_body(alice.post(FILES, content=chunks()), 413)["error_type"] == "request_too_large"


# --- failed-auth throttling ------------------------------------------------------------------------
def test_failed_auth_is_throttled_per_address_across_processes_and_never_locks_out_a_key(gs):
    other = GatewayServer(gs.settings).start()  # a second gateway process on the same Redis
    try:
        # Per address: wrong secrets for key ids that do not even exist.
        here = {"x-forwarded-for": "203.0.113.7"}
        codes = [
            httpx.get(f"{gs.url}{REQ}/x/status", headers={**here, **auth(f"nobody:guess-{n}")}).status_code
            for n in range(30)
        ]
        assert codes[:FAIL_LIMIT] == [401] * FAIL_LIMIT and set(codes[FAIL_LIMIT:]) == {429}, codes
        throttled = httpx.get(f"{other.url}{REQ}/x/status", headers={**here, **auth(BOB)})
        body = error_body(throttled, 429)
        assert body["error_type"] == "rate_limited" and 1 <= int(throttled.headers["retry-after"]) <= 60
        # Another address is not affected.
        assert (
            httpx.get(
                f"{gs.url}{REQ}/x/status", headers={"x-forwarded-for": "198.51.100.1", **auth(OPS)}
            ).status_code
            == 404
        )
        # Guesses at alice's secret from many addresses count against those addresses only: they never
        # lock alice out (throttling per key id let anyone do that, and told which key ids exist).
        with gs.client(ALICE) as client:
            assert client.get(f"{REQ}/x/status").status_code == 404  # verified (and cached) before the attack
        codes = [
            httpx.get(
                f"{other.url}{REQ}/x/status",
                headers={"x-forwarded-for": f"192.0.2.{n}", **auth(f"alice:guess-{n}")},
            ).status_code
            for n in range(FAIL_LIMIT + 3)
        ]
        assert set(codes) == {401}, codes
        with gs.client(ALICE) as client:
            assert client.get(f"{REQ}/x/status").status_code == 404, "a verified credential still passes"
        fresh = GatewayServer(gs.settings).start()  # has verified nothing: alice's key still passes
        try:
            assert httpx.get(f"{fresh.url}{REQ}/x/status", headers=auth(ALICE)).status_code == 404
        finally:
            fresh.stop()
    finally:
        other.stop()


# --- hand-written hostile requests ------------------------------------------------------------------
HOSTILE = [  # (name, method, path, headers, body) -> never a 5xx, always JSON
    ("bom", "POST", V2, {}, b'\xef\xbb\xbf{"image_url": "https://e.x/a.png"}'),
    ("utf16", "POST", V2, {}, '{"image_url": "https://e.x/a.png"}'.encode("utf-16")),
    ("invalid-utf8", "POST", V2, {}, b'{"image_url": "https://e.x/\xff\xfe.png"}'),
    ("invalid-utf8-key", "POST", INITIATE, {}, b'{"\xc3": "x"}'),
    ("truncated", "POST", V2, {}, b'{"image_url": "https://e.x/a.png"'),
    ("two-documents", "POST", V2, {}, b'{"a": 1}{"b": 2}'),
    ("duplicate-keys", "POST", V2, {}, b'{"image_url": "https://e.x/a.png", "image_url": "s3://other/k"}'),
    ("duplicate-keys-initiate", "POST", INITIATE, {}, b'{"file_name": "a", "file_name": "b"}'),
    ("huge-int", "POST", V2, {}, b'{"image_url": "https://e.x/a.png", "output_mask": 1' + b"0" * 5000 + b"}"),
    ("null", "POST", V2, {}, b"null"),
    ("string", "POST", RUN2, {}, b'"https://e.x/a.png"'),
    ("array", "POST", INITIATE, {}, b"[]"),
    ("binary-as-json", "POST", V1, {"content-type": "application/json"}, bytes(range(256))),
    ("json-as-png", "POST", V2, {"content-type": "image/png"}, json.dumps(GOOD).encode()),
    ("form-as-json", "POST", INITIATE, {"content-type": "application/x-www-form-urlencoded"}, b"file_name=a"),
    ("nul-in-string", "POST", V2, {}, b'{"image_url": "https://e.x/a\\u0000.png"}'),
    ("long-key", "POST", V2, {}, json.dumps({"k" * 100_000: 1, **GOOD}).encode()),
    ("many-keys", "POST", V2, {}, json.dumps({f"k{n}": n for n in range(20_000)}).encode()),
    ("wrong-types", "POST", V2, {}, b'{"image_url": ["a"], "model": {"x": 1}, "sync_mode": "maybe"}'),
    ("initiate-wrong-types", "POST", INITIATE, {}, b'{"content_type": 5, "file_name": null}'),
    ("traversal-id", "GET", f"{REQ}/..%2F..%2Fadmin%2Fwebhooks%2Ffailed/status", {}, None),
    ("traversal-id-2", "GET", f"{REQ}/%2e%2e/%2e%2e/status", {}, None),
    ("long-id", "GET", f"{REQ}/{'a' * 8000}", {}, None),
    ("long-id-cancel", "PUT", f"{REQ}/{E_ACUTE * 2000}/cancel", {}, None),
    ("long-id-stream", "GET", f"{REQ}/{'z' * 4000}/status/stream", {}, None),
    ("invalid-utf8-path", "GET", f"{REQ}/%ff%fe/status", {}, None),
    ("object-traversal", "GET", "/objects/../../etc/passwd?exp=1&sig=x", {}, None),
    ("object-bad-exp", "GET", "/objects/a?exp=99999999999999999999999&sig=" + "0" * 64, {}, None),
    ("proxy-foreign", "POST", PROXY, {"x-fal-target-url": "https://evil.example/x"}, b"{}"),
    (
        "proxy-traversal",
        "GET",
        PROXY,
        {"x-fal-target-url": "https://rest.fal.ai/../admin/webhooks/failed"},
        None,
    ),
    ("proxy-bad-url", "GET", PROXY, {"x-fal-target-url": "https://[::1"}, None),
    ("timeout-long", "POST", V2, {"X-Fal-Request-Timeout": "1" * 10_000}, json.dumps(GOOD).encode()),
    ("priority-odd", "POST", V2, {"X-Fal-Queue-Priority": b"\xff" * 100}, json.dumps(GOOD).encode()),
    ("auth-huge", "GET", f"{REQ}/x/status", {"authorization": "Key " + "a" * 20_000}, None),
    ("auth-colon", "GET", f"{REQ}/x/status", {"authorization": "Key :"}, None),
    ("auth-latin1", "GET", f"{REQ}/x/status", {"authorization": b"Key alice:\xe9\xff"}, None),
    ("admin-limit", "GET", "/admin/webhooks/failed?limit=1e400", {}, None),
    ("admin-limit-neg", "GET", "/admin/webhooks/failed?limit=-1", {}, None),
    ("ops-minutes-nan", "GET", "/admin/ops/status?minutes=nan", {}, None),
    ("ops-minutes-inf", "GET", "/admin/ops/status?minutes=-inf", {}, None),
    ("ops-all-odd", "GET", "/admin/ops/status?all=%ff", {}, None),
    ("playground-traversal", "GET", "/playground/..%2F..%2Fapp.py", {}, None),
    (
        "webhook-huge",
        "POST",
        V2 + "?fal_webhook=https://h.example/" + "a" * 5000,
        {},
        json.dumps(GOOD).encode(),
    ),
    ("file-name-odd", "POST", FILES, {"X-Fal-File-Name": b"../../\xe9" * 50}, b"x"),
    ("storage-type-odd", "POST", INITIATE + "?storage_type=%00%ff", {}, b"{}"),
    ("logs-odd", "GET", f"{REQ}/x/status?logs=%ff", {}, None),
]


@pytest.mark.parametrize(
    ("method", "path", "headers", "body"), [case[1:] for case in HOSTILE], ids=[case[0] for case in HOSTILE]
)
def test_hostile_request_gets_a_clear_4xx(gs, gateway_log, method, path, headers, body):
    before = len(gateway_log.messages)
    with httpx.Client(base_url=gs.url, headers=auth(OPS), timeout=30) as client:
        response = client.request(method, path, headers=headers, content=body)
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if response.status_code >= 400:
        assert response.headers["content-type"].startswith("application/json")
        body = strict_json(response.text)
        assert body.get("detail") or body.get("status") == "NOT_FOUND", body  # fal's cancel answers a status
    assert not [m for m in gateway_log.messages[before:] if "unhandled" in m]


METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE")


def test_every_method_on_every_route(gs, spec):
    """No method on any documented path (or the metrics and object routes) answers a 5xx or non-JSON."""
    paths = [*spec["paths"], "/metrics", "/objects/{key}", "/", "/fal-ai/birefnet/v2", "/queue/unknown/app"]
    with httpx.Client(base_url=gs.url, headers=auth(OPS), timeout=30) as client:
        for path in paths:
            concrete = path.replace("{request_id}", str(uuid.uuid4())).replace("{key}", "nothing")
            for method in METHODS:
                response = client.request(
                    method, concrete, content=b"{}" if method in ("POST", "PUT") else None
                )
                assert response.status_code < 500, (method, path, response.status_code, response.text[:300])
                if response.status_code >= 400 and method != "HEAD":
                    assert response.headers["content-type"].startswith("application/json"), (method, path)
                    strict_json(response.text)
