"""Gateway building blocks without a stack: URL conventions, API keys, signed URLs, input parsing."""

from __future__ import annotations

import time

import pytest

from common.adapters.storage import ObjectStore
from common.domain.auth import (
    ApiKeyConfig,
    KeyRing,
    credential_from_header,
    hash_secret,
    new_key,
    verify_secret,
)
from common.domain.errors import InputErrors
from common.domain.signed_urls import make_token, object_url, object_url_valid, read_token
from common.settings import Settings
from gateway.inputs import check_url, own_bucket_key, priority
from gateway.parsing import json_object_body as parse_body
from gateway.parsing import lifecycle_seconds, start_timeout
from gateway.responses import FalError
from gateway.routing import canonical_path, proxy_target
from producer.admission import validate_input


@pytest.mark.parametrize(
    ("path", "host", "expected"),
    [
        ("/fal-ai/birefnet/v2", "api.example", "/run/fal-ai/birefnet/v2"),
        ("/fal-ai/birefnet/v2", "queue.api.example:8443", "/queue/fal-ai/birefnet/v2"),
        (
            "/fal-ai/birefnet/requests/abc/status/",
            "api.example",
            "/queue/fal-ai/birefnet/requests/abc/status",
        ),
        ("/fal-ai/birefnet/v2/requests/abc", "queue.x", "/queue/fal-ai/birefnet/requests/abc"),
        ("/queue/fal-ai/birefnet/v2/requests/abc/cancel", "x", "/queue/fal-ai/birefnet/requests/abc/cancel"),
        ("/run/fal-ai/birefnet/", "x", "/run/fal-ai/birefnet"),
        ("/.well-known/jwks.json", "queue.x", "/.well-known/jwks.json"),
        ("/rest/storage/upload/initiate", "x", "/rest/storage/upload/initiate"),
        ("/", "x", "/"),
    ],
)
def test_canonical_paths(path, host, expected):
    assert canonical_path(path, host) == expected


def test_proxy_targets_only_fal_hosts():
    assert proxy_target("https://queue.fal.run/fal-ai/birefnet/v2?fal_webhook=https%3A%2F%2Fh") == (
        "/queue/fal-ai/birefnet/v2",
        b"fal_webhook=https%3A%2F%2Fh",
    )
    assert proxy_target("https://fal.run/fal-ai/birefnet") == ("/run/fal-ai/birefnet", b"")
    assert proxy_target("https://rest.fal.ai/storage/upload/initiate?storage_type=fal-cdn-v3")[0] == (
        "/rest/storage/upload/initiate"
    )
    for foreign in ("https://evil.example/x", "http://queue.fal.run/x", "queue.fal.run/x", ""):
        assert proxy_target(foreign) is None


def test_keys_hashed_at_rest_and_cached():
    scrypt, sha = hash_secret("s1"), hash_secret("t0ken", "sha256")
    assert scrypt.startswith("scrypt$") and "s1" not in scrypt
    assert verify_secret("s1", scrypt) and not verify_secret("s2", scrypt)
    ring = KeyRing(
        [ApiKeyConfig(id="a", hash=scrypt, user_id="u-a"), ApiKeyConfig(id="b", hash=sha, admin=True)]
    )
    assert ring.authenticate("a:s1").user_id == "u-a"
    assert ring.cached("a:s1") is not None, "verified once, then cheap"
    assert ring.authenticate("a:nope") is None and ring.authenticate("zz:s1") is None
    assert ring.authenticate("t0ken").key_id == "b" and ring.authenticate("b:t0ken").admin
    assert ring.authenticate("s1") is None, "bare tokens only match sha256 keys"
    assert credential_from_header("Key a:s1") == "a:s1" and credential_from_header("Bearer x") == "x"
    assert credential_from_header("Basic x") is None and credential_from_header(None) is None
    fal_key, entry = new_key("team", admin=True)
    assert fal_key.startswith("team:") and verify_secret(fal_key.split(":", 1)[1], entry["hash"])


def test_signed_urls_and_tokens():
    url = object_url("https://gw.example/", "k", "results/a b.png", 60)
    assert url.startswith("https://gw.example/objects/results/a%20b.png?exp=")
    exp, sig = url.split("exp=")[1].split("&sig=")
    assert object_url_valid("k", "results/a b.png", exp, sig)
    assert not object_url_valid("k", "results/other.png", exp, sig)
    assert not object_url_valid("other", "results/a b.png", exp, sig)
    assert not object_url_valid("k", "results/a b.png", str(int(time.time()) - 1), sig)
    token, _ = make_token("k", "alice", 60)
    assert read_token("k", token) == "alice" and read_token("x", token) is None
    assert read_token("k", make_token("k", "alice", -5)[0]) is None


def test_headers_and_bodies():
    assert start_timeout(None) is None and start_timeout("30.0") == 30.0 and start_timeout("0") is None
    for bad in ("soon", "-1", "nan", "inf", "1e3", "null", "", "9" * 400):
        with pytest.raises(FalError) as caught:
            start_timeout(bad)
        assert caught.value.status_code == 400 and caught.value.body["error_type"] == "bad_request"
    assert priority("LOW") == "low" and priority("urgent") == "normal" and priority(None) == "normal"
    assert lifecycle_seconds('{"expiration_duration_seconds": 600, "initial_acl": "private"}') == 600
    assert lifecycle_seconds(None) is None and lifecycle_seconds('{"initial_acl": "private"}') is None
    for bad in (
        "nope",
        '{"expiration_duration_seconds": -1}',
        '{"expiration_duration_seconds": Infinity}',
        '{"expiration_duration_seconds": 1e400}',
        "[" * 1000,
        '{"expiration_duration_seconds": "9"}',
    ):
        with pytest.raises(FalError) as caught:
            lifecycle_seconds(bad)
        assert (
            caught.value.status_code == 400
            and "x-fal-object-lifecycle-preference" in caught.value.body["detail"]
        )
    assert parse_body(b"") == {} and parse_body(b'{"a": 1}') == {"a": 1}
    with pytest.raises(FalError):
        parse_body(b"[1]")


def test_validation_details_are_fastapis():
    settings = Settings()
    with pytest.raises(InputErrors) as caught:
        validate_input(
            "v2",
            {"image_url": "https://x/a.png", "model": "Matting", "operating_resolution": "2304x2304"},
            settings,
        )
    assert caught.value.details[0]["loc"] == ["body", "operating_resolution"]
    parsed, variant = validate_input(
        "v2",
        {
            "image_url": "https://x/a.png",
            "model": "General Use (Dynamic)",
            "operating_resolution": "2304x2304",
        },
        settings,
    )
    assert variant.id == "general-dynamic" and parsed.operating_resolution.value == "2304x2304"
    _, v1 = validate_input("v1", {"image_url": "https://x/a.png"}, settings)
    assert v1.id == "v1-general-light"


def test_submit_time_ssrf_check_uses_the_netguard_policy():
    from common.adapters.netguard import NetPolicy

    strict = NetPolicy.from_settings(Settings(fetch_allow_networks=(), fetch_allowed_ports=(80, 443)))
    for url in (
        "http://127.0.0.1/a.png",
        "http://169.254.169.254/latest",
        "http://10.0.0.8/x",
        "http://[::1]/x",
    ):
        with pytest.raises(InputErrors) as caught:
            check_url(url, strict, ["body", "image_url"])
        assert caught.value.details[0]["type"] == "file_download_error"
    check_url("data:image/png;base64,AAAA", strict, ["body", "image_url"])
    settings = Settings(s3_endpoint_url="http://minio:9000", output_bucket="out")
    assert own_bucket_key("http://minio:9000/out/results/files/x/a%20b.png?X-Amz-Signature=1", settings) == (
        "results/files/x/a b.png"
    )
    assert own_bucket_key("http://minio:9000/other/k", settings) is None


def test_output_urls_per_style(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    settings = Settings(
        gateway_output_urls="gateway",
        gateway_public_url="https://gw.example",
        gateway_signing_secret="k",
        s3_endpoint_url="http://127.0.0.1:1",
    )
    objects = ObjectStore(settings)
    assert objects.url_for("b", "results/x.png", ttl=60, api=True).startswith(
        "https://gw.example/objects/results/x.png?"
    )
    presigned = objects.url_for("b", "results/x.png", ttl=10**9)
    assert "X-Amz-Expires=604800" in presigned, "capped at SigV4's 7 days"
    with pytest.raises(ValueError):
        Settings(gateway_output_urls="gateway")


def test_one_boolean_parser_for_headers_queries_and_metadata():
    from gateway.queue_api import options
    from producer.admission import flag, parse_bool

    for word in ("1", "true", "Yes", " on "):
        assert parse_bool(word) is True and flag(word)
        assert options("v2", None, None, None, word).no_retry, "x-fal-no-retry reads the same words"
    for word in ("0", "false", "NO", "off"):
        assert parse_bool(word) is False and not flag(word)
    assert (
        parse_bool("maybe") is None
        and not flag(None)
        and not options("v2", None, None, None, "maybe").no_retry
    )


def test_error_types_build_their_own_fal_bodies():
    from common.domain.errors import InvalidInputError, RequestCancelled, RequestTimeout

    # One start-timeout body for the worker's claim check and the gateway's sweeper.
    assert RequestTimeout().body() == {
        "detail": "Request timed out before it started",
        "error_type": "request_timeout",
    }
    assert RequestTimeout.status_code == 504 and RequestCancelled().status_code == 499
    assert RequestCancelled().body() == {"detail": "Request was cancelled", "error_type": "client_cancelled"}
    assert InvalidInputError("bad", field="model").body() == {
        "detail": [{"loc": ["body", "model"], "msg": "bad", "type": "value_error"}]
    }
    details = [{"type": "missing", "loc": ["body", "image_url"], "msg": "Field required", "input": {}}]
    assert InputErrors(details).body() == {"detail": details} and InputErrors(details).error_type == "missing"
