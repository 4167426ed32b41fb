"""Security findings reproduced against real processes on 127.0.0.1: uploads that could run script on the
gateway's origin, lock-out and enumeration through failed-auth throttling, files left by refused submits,
unbounded memory for large bodies, reserved key ids, malformed signed-URL parameters, credentials in
diagnostics, open metrics ports, development secrets in production, and the SSRF guard, SNS host and webhook
retry details. Real parts: redis-server, moto S3, the gateway on uvicorn (in this process, or as
`python -m gateway`), `python -m deliverer`, `python -m ops`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote, urlsplit

import httpx
import pytest
import redis

from common.adapters import netguard
from common.adapters.netguard import NetPolicy, UrlNotAllowedError
from common.domain.auth import ApiKeyConfig, hash_secret
from common.settings import Settings
from common.state import keys
from common.state.jobs import JobStore
from common.state.webhooks import list_attempts, retry_delay
from devstack.services import free_port
from producer.sns import SNS_HOST, SnsRefused, SnsVerifier
from tests.helpers.gateway import ALICE, BOB, GatewayServer, GatewayStack, auth, start_gateway_stack
from tests.helpers.images import data_uri, png_bytes
from tests.helpers.stack import Stack, wait_for

V2 = "/queue/fal-ai/birefnet/v2"
REQ = "/queue/fal-ai/birefnet/requests"
FILES, INITIATE = "/files/upload", "/rest/storage/upload/initiate"
FAIL_LIMIT = 5


@pytest.fixture(scope="module")
def gs(redis_server, moto_endpoint, tmp_path_factory) -> GatewayStack:
    stack = start_gateway_stack(
        redis_server.port,
        moto_endpoint,
        tmp_path_factory.mktemp("security"),
        workers=(),
        webhooks=False,
        extra={"BIREFNET_GATEWAY_AUTH_FAIL_LIMIT": str(FAIL_LIMIT)},
    )
    yield stack
    stack.close()


def clear_auth_failures(gs: GatewayStack) -> None:
    """Failed-auth counters live in Redis, shared by the stack's gateways: each test starts clean."""
    client = redis.Redis.from_url(gs.settings.redis_url)
    client.delete(*client.keys(f"{keys.AUTH_FAIL_PREFIX}*"), "-")


@pytest.fixture(autouse=True)
def no_auth_failures(request) -> None:
    if "gs" in request.fixturenames:
        clear_auth_failures(request.getfixturevalue("gs"))


def gateway_with(gs: GatewayStack, **update) -> GatewayServer:
    """Another gateway process on the same stack, with some settings changed."""
    port = free_port()
    if update.get("gateway_output_urls") == "gateway":
        update = {
            "gateway_signing_secret": "a-real-secret-for-tests",
            "gateway_public_url": f"http://127.0.0.1:{port}",
            **update,
        }
    return GatewayServer(gs.settings.model_copy(update=update), port=port).start()


def s3_keys(gs: GatewayStack, prefix: str) -> list[str]:
    import boto3

    client = boto3.client("s3", endpoint_url=gs.settings.s3_endpoint_url, region_name=gs.settings.aws_region)
    listed = client.list_objects_v2(Bucket=gs.settings.output_bucket, Prefix=prefix)
    return [item["Key"] for item in listed.get("Contents", [])]


# --- uploads: nothing a browser would run, and served files sandboxed ----------------------------------
def test_uploads_take_image_types_only_and_served_files_cannot_run_script(gs):
    server = gateway_with(gs, gateway_output_urls="gateway")
    try:
        with httpx.Client(base_url=server.url, headers=auth(ALICE), timeout=30) as client:
            page = b"<html><script>alert(sessionStorage.getItem('falKey'))</script></html>"
            for active in (
                "text/html",
                "image/svg+xml",
                "application/xhtml+xml",
                "text/xml",
                "application/javascript",
            ):
                refused = client.post(FILES, content=page, headers={"content-type": active})
                assert refused.status_code == 415, (active, refused.text)
                assert refused.json()["error_type"] == "unsupported_media_type"
                assert client.post(INITIATE, json={"content_type": active}).status_code == 422, active

            uploaded = client.post(
                FILES,
                content=png_bytes(),
                headers={"content-type": "image/png", "x-fal-file-name": "cat.png"},
            )
            assert uploaded.status_code == 200, uploaded.text
            served = httpx.get(uploaded.json()["access_url"])
            assert served.status_code == 200 and served.content == png_bytes()
            assert served.headers["content-type"] == "image/png"
            assert served.headers["x-content-type-options"] == "nosniff"
            assert served.headers["content-security-policy"] == "default-src 'none'; sandbox"
            assert served.headers["content-disposition"].startswith("attachment")

            # Bytes without a type are stored as such and downloaded, never rendered.
            unlabelled = client.post(FILES, content=page)
            assert unlabelled.status_code == 200
            served = httpx.get(unlabelled.json()["access_url"])
            assert served.headers["content-type"] == "application/octet-stream"
            assert served.headers["content-disposition"].startswith("attachment")
            assert served.headers["content-security-policy"] == "default-src 'none'; sandbox"
    finally:
        server.stop()


# --- failed-auth throttling: per client, no lock-out, no enumeration -------------------------------------
def statuses(url: str, credentials: list[str], addresses: list[str]) -> list[int]:
    return [
        httpx.get(
            f"{url}{REQ}/x/status", headers={"x-forwarded-for": address, **auth(credential)}
        ).status_code
        for credential, address in zip(credentials, addresses, strict=True)
    ]


def test_guesses_from_other_clients_never_lock_out_a_key_nor_reveal_which_ids_exist(gs):
    many = [f"198.51.100.{n}" for n in range(4 * FAIL_LIMIT)]
    fresh = GatewayServer(gs.settings).start()  # has verified no credential: bob's must be checked
    try:
        known = statuses(fresh.url, [f"bob:wrong-{n}" for n in range(len(many))], many)
        unknown = statuses(fresh.url, [f"nobody-{n % 2}:wrong-{n}" for n in range(len(many))], many)
        assert known == unknown == [401] * len(many), (known, unknown)
        assert httpx.get(f"{fresh.url}{REQ}/x/status", headers=auth(BOB)).status_code == 404, (
            "bob is not locked out"
        )
        # From one client, configured and unknown ids are throttled alike.
        known = statuses(
            fresh.url, [f"bob:wrong-{n}" for n in range(FAIL_LIMIT + 2)], ["203.0.113.10"] * (FAIL_LIMIT + 2)
        )
        unknown = statuses(
            fresh.url,
            [f"nobody:wrong-{n}" for n in range(FAIL_LIMIT + 2)],
            ["203.0.113.11"] * (FAIL_LIMIT + 2),
        )
        assert known == unknown == [401] * FAIL_LIMIT + [429, 429], (known, unknown)
        # An IPv6 client is its /64: hopping between its addresses does not reset the count.
        hopping = statuses(
            fresh.url,
            [f"nobody:wrong-{n}" for n in range(FAIL_LIMIT + 2)],
            [f"2001:db8:1:2::{n + 1:x}" for n in range(FAIL_LIMIT + 2)],
        )
        assert hopping == [401] * FAIL_LIMIT + [429, 429], hopping
    finally:
        fresh.stop()


def test_forwarded_headers_count_only_from_trusted_proxies(gs):
    assert Settings().gateway_trust_forwarded is False, "forwarded headers are ignored unless switched on"
    for update in (
        {"gateway_trust_forwarded": False},
        {"gateway_trust_forwarded": True, "gateway_trusted_proxies": ("10.0.0.0/8",)},
    ):
        server = GatewayServer(gs.settings.model_copy(update=update)).start()
        try:
            with httpx.Client(base_url=server.url, headers=auth(ALICE)) as client:
                submitted = client.post(
                    V2,
                    json={"image_url": "https://example.com/a.png"},
                    headers={"x-forwarded-host": "evil.example", "x-forwarded-proto": "https"},
                )
                assert submitted.status_code == 200
                assert urlsplit(submitted.json()["status_url"]).netloc == f"127.0.0.1:{server.port}", update
                client.put(f"{REQ}/{submitted.json()['request_id']}/cancel")
            # Every guess claims another address: the peer (127.0.0.1, not a trusted proxy here) is the
            # client.
            codes = statuses(
                server.url,
                [f"nobody-{n}:wrong" for n in range(FAIL_LIMIT + 2)],
                [f"192.0.2.{n}" for n in range(FAIL_LIMIT + 2)],
            )
            assert codes == [401] * FAIL_LIMIT + [429, 429], (update, codes)
        finally:
            server.stop()
        clear_auth_failures(gs)


# --- refused submits store nothing ----------------------------------------------------------------------
def test_a_submit_refused_by_the_keys_limit_leaves_no_input_behind(gs):
    capped = ApiKeyConfig(id="capped", hash=hash_secret("capped-secret", "sha256"), requests_per_minute=1)
    keys = [*gs.settings.gateway_api_keys, capped]
    server = GatewayServer(gs.settings.model_copy(update={"gateway_api_keys": keys})).start()
    inputs = f"{gs.settings.output_prefix}requests/"
    before = [k for k in s3_keys(gs, inputs) if k.endswith("/input")]
    big = data_uri(os.urandom(400_000))  # over the inline limit: travels through S3
    try:
        with httpx.Client(base_url=server.url, headers=auth("capped:capped-secret"), timeout=30) as client:
            first = client.post(V2, json={"image_url": big})
            assert first.status_code == 200, first.text
            refused = [client.post(V2, json={"image_url": big}) for _ in range(3)]
            assert [r.status_code for r in refused] == [429] * 3
            client.put(f"{REQ}/{first.json()['request_id']}/cancel")
    finally:
        server.stop()
    stored = [k for k in s3_keys(gs, inputs) if k.endswith("/input") and k not in before]
    assert stored == [f"{inputs}{first.json()['request_id']}/input"], stored


# --- large bodies share a memory budget ----------------------------------------------------------------
def test_large_bodies_beyond_the_budget_are_a_429_before_they_are_read(gs):
    size = 3 * 1024 * 1024
    server = GatewayServer(
        gs.settings.model_copy(update={"gateway_body_budget_bytes": 4 * 1024 * 1024})
    ).start()
    try:
        # One large body in progress (its sender is slow): it holds 3 MiB of the 4 MiB budget.
        slow = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        slow.sendall(
            f"POST {V2} HTTP/1.1\r\nHost: x\r\nAuthorization: Key {ALICE}\r\nContent-Type: application/json"
            f"\r\nContent-Length: {size}\r\n\r\n".encode()
            + b'{"image_url": "'
        )
        time.sleep(0.5)
        with httpx.Client(base_url=server.url, headers=auth(ALICE), timeout=30) as client:
            second = client.post(V2, content=b" " * size, headers={"content-type": "application/json"})
            assert second.status_code == 429, second.text
            assert second.json()["error_type"] == "server_busy" and int(second.headers["retry-after"]) >= 1
            small = client.post(V2, json={"image_url": "https://example.com/a.png"})
            assert small.status_code == 200, "small bodies never wait for the budget"
            client.put(f"{REQ}/{small.json()['request_id']}/cancel")
            slow.close()  # the first body is abandoned: its share of the budget comes back
            wait_for(
                lambda: (
                    client.post(
                        V2, content=b" " * size, headers={"content-type": "application/json"}
                    ).status_code
                    != 429
                ),
                10,
                "the budget to be released",
            )
    finally:
        server.stop()


# --- processes refuse unsafe configuration at start -----------------------------------------------------
def exits_with(proc: subprocess.Popen, log: str, stack: Stack, timeout: float = 30) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"the process kept running: {(stack.log_dir / log).read_text()[-2000:]}")
    assert proc.returncode != 0
    return (stack.log_dir / log).read_text()


def test_reserved_owner_names_are_refused_as_key_ids_at_start(stack: Stack):
    for reserved in ("anonymous", "", "s3"):
        keys = json.dumps([{"id": reserved, "hash": hash_secret("x", "sha256")}])
        name = f"gateway-{reserved or 'empty'}"
        proc = stack.start(
            ["-m", "gateway"],
            name,
            {
                "BIREFNET_GATEWAY_API_KEYS": keys,
                "BIREFNET_GATEWAY_HOST": "127.0.0.1",
                "BIREFNET_GATEWAY_PORT": str(free_port()),
            },
        )
        text = exits_with(proc, f"{name}.log", stack)
        assert "key id" in text and ("reserved" in text or "empty" in text), text[-2000:]


def test_production_settings_refuse_generated_keys_and_placeholder_secrets(stack: Stack):
    production = {
        "BIREFNET_ALLOW_DEV_SECRETS": "false",
        "BIREFNET_GATEWAY_HOST": "127.0.0.1",
        "BIREFNET_GATEWAY_PORT": str(free_port()),
    }
    proc = stack.start(["-m", "gateway"], "gateway-prod", production)
    text = exits_with(proc, "gateway-prod.log", stack)
    assert (
        "BIREFNET_GATEWAY_SIGNING_SECRET is empty" in text
        and "BIREFNET_WEBHOOK_SIGNING_KEYS is empty" in text
    )

    placeholders = {
        **production,
        "BIREFNET_GATEWAY_SIGNING_SECRET": "CHANGE-ME",
        "BIREFNET_WEBHOOK_SIGNING_KEYS": "11" * 32,
        "AWS_SECRET_ACCESS_KEY": "birefnet-change-me",
        "BIREFNET_REDIS_URL": stack.env["BIREFNET_REDIS_URL"].replace("redis://", "redis://:changeme@"),
    }
    proc = stack.start(["-m", "deliverer"], "deliverer-prod", placeholders)
    text = exits_with(proc, "deliverer-prod.log", stack)
    for name in (
        "BIREFNET_GATEWAY_SIGNING_SECRET is a placeholder",
        "AWS_SECRET_ACCESS_KEY is a placeholder",
        "the password in BIREFNET_REDIS_URL is a placeholder",
    ):
        assert name in text, text[-2000:]
    assert "changeme@" not in text, "the refusal names the setting, not its value"

    # Real secrets: the deliverer starts (and stays up).
    configured = {
        **production,
        "BIREFNET_GATEWAY_SIGNING_SECRET": "k3Jd9-real-secret-Zq",
        "BIREFNET_WEBHOOK_SIGNING_KEYS": "22" * 32,
    }
    proc = stack.start(["-m", "deliverer"], "deliverer-ok", configured)
    time.sleep(3)
    assert proc.poll() is None, (stack.log_dir / "deliverer-ok.log").read_text()[-2000:]


# --- malformed signed-URL parameters and upload tokens --------------------------------------------------
def test_malformed_object_parameters_and_upload_tokens_are_a_4xx(gs):
    server = gateway_with(gs, gateway_output_urls="gateway")
    log_lines: list[str] = []
    import logging

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            log_lines.append(f"{record.levelname} {record.getMessage()}")

    capture = Capture()
    logging.getLogger("gateway").addHandler(capture)
    try:
        key = quote(f"{gs.settings.output_prefix}files/x/y.png")
        for query in (
            "exp=%C2%B2&sig=abc",
            f"exp={'9' * 5000}&sig=abc",
            "exp=99999999999&sig=%C3%A9%C3%A9",
            "exp=%EF%BC%91%EF%BC%92&sig=x",
            "exp=-1&sig=x",
            "exp=1e9&sig=x",
            "sig=%00",
        ):
            answer = httpx.get(f"{server.url}/objects/{key}?{query}")
            assert 400 <= answer.status_code < 500, (query, answer.status_code, answer.text)
            assert answer.json()["detail"]
        for token in (b"\xc3\xa9.\xc3\xa9", b"e30.\xff", b"\xe9" * 40 + b"." + b"A" * 32, b"!!!.???", b"."):
            answer = httpx.post(
                f"{server.url}{FILES}", content=b"x", headers={"authorization": b"Bearer " + token}
            )
            assert answer.status_code == 401, (token, answer.status_code, answer.text)
    finally:
        logging.getLogger("gateway").removeHandler(capture)
        server.stop()
    assert not [line for line in log_lines if "unhandled" in line or line.startswith("ERROR")], log_lines


def test_objects_and_upload_routes_are_documented_for_the_fuzzers(gs):
    spec = httpx.get(f"{gs.url}/openapi.json").json()
    objects = spec["paths"]["/objects/{key}"]["get"]
    params = {p["name"]: p["schema"] for p in objects["parameters"]}
    assert params["exp"]["pattern"] == "^[0-9]{0,15}$" and "pattern" in params["sig"]
    assert "404" in objects["responses"]
    upload = spec["paths"][FILES]["post"]
    assert "415" in upload["responses"]
    assert any(
        p["name"] == "authorization" and "upload token" in p["description"] for p in upload["parameters"]
    )


# --- credentials never shown --------------------------------------------------------------------------
def test_ops_status_never_prints_the_redis_password(stack: Stack):
    url = f"redis://admin:S3cretPassw0rd@127.0.0.1:{free_port()}/0"
    for extra in ([], ["--json"]):
        done = subprocess.run(
            [sys.executable, "-m", "ops", "status", "--redis-url", url, *extra],
            capture_output=True,
            text=True,
            timeout=60,
            env={**stack.env, "COLUMNS": "200"},
        )
        assert done.returncode == 3, done.stdout + done.stderr
        shown = done.stdout + done.stderr
        assert "Redis unreachable" in shown and "admin:***@127.0.0.1" in shown, shown
        assert "S3cretPassw0rd" not in shown, shown


def test_log_lines_never_carry_credentials(stack: Stack):
    script = """
import logging
from common.observability.redact import install_log_redaction
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
install_log_redaction()
log = logging.getLogger("any.library")
log.warning("connecting to %s", "rediss://user:Hunter2Pass@redis.internal:6380/0")
log.info("headers %s", {"Authorization": "Key alice:alice-Secret-Value", "Accept": "*/*"})
log.info("fetching https://bucket.s3.amazonaws.com/k?X-Amz-Signature=deadbeefcafe&X-Amz-Credential=AKIAXX")
log.info("object /objects/k?exp=1&sig=SignatureValue123")
try:
    raise RuntimeError("cannot reach amqp://guest:GuestPass99@mq:5672//")
except RuntimeError:
    log.exception("broker down")
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=stack.env
    )
    assert done.returncode == 0, done.stderr
    for secret in (
        "Hunter2Pass",
        "alice-Secret-Value",
        "deadbeefcafe",
        "AKIAXX",
        "SignatureValue123",
        "GuestPass99",
    ):
        assert secret not in done.stderr, done.stderr
    assert "rediss://user:***@redis.internal" in done.stderr and "Key alice:***" in done.stderr, done.stderr


def test_settings_dumps_and_headers_mask_credentials(stack: Stack):
    env = {
        **stack.env,
        "BIREFNET_REDIS_URL": "redis://user:RedisPw77@127.0.0.1:1/0",
        "BIREFNET_GATEWAY_SIGNING_SECRET": "SigningSecret88",
        "BIREFNET_PRODUCER_HTTP_TOKEN": "HttpToken99",
    }
    done = subprocess.run(
        [sys.executable, "-m", "common.settings", "--current"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert shown["redis_url"] == "redis://user:***@127.0.0.1:1/0" and shown["gateway_signing_secret"] == "***"
    for secret in ("RedisPw77", "SigningSecret88", "HttpToken99"):
        assert secret not in done.stdout
    from common.observability.redact import redact_headers

    assert redact_headers({"Authorization": "Key alice:s3cret", "Cookie": "a=b", "Accept": "*/*"}) == {
        "Authorization": "Key alice:***",
        "Cookie": "***",
        "Accept": "*/*",
    }


# --- metrics ports bind loopback by default --------------------------------------------------------------
def listening_addresses(port: int) -> set[str]:
    """Local addresses with a listening TCP socket on `port` (from /proc/net/tcp)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if int(hex_port, 16) == port and state == "0A":
                found.add(address)
    return found


def test_metrics_ports_bind_loopback_unless_told_otherwise(stack: Stack):
    port = free_port()
    proc = stack.start(
        ["-m", "deliverer"], "deliverer-metrics", {"BIREFNET_WEBHOOKS_METRICS_PORT": str(port)}
    )
    wait_for(lambda: listening_addresses(port), 60, "the deliverer's metrics port")
    assert listening_addresses(port) == {"0100007F"}, "127.0.0.1 only (0.0.0.0 would be 00000000)"
    assert httpx.get(f"http://127.0.0.1:{port}/metrics").status_code == 200
    proc.terminate()


# --- SSRF guard, SNS hosts, webhook retry jitter ------------------------------------------------------
@pytest.mark.parametrize(
    "host", ["[::ffff:0:7f00:1]", "[::ffff:0:a9fe:a9fe]", "[::ffff:0:a00:1]", "[64:ff9b:1::7f00:1]"]
)
def test_ipv4_translated_addresses_are_judged_by_their_ipv4(host):
    policy = NetPolicy.from_settings(Settings(fetch_allow_networks=(), fetch_allowed_ports=(80, 443)))
    with pytest.raises(UrlNotAllowedError):
        netguard.check_url(f"http://{host}/cat.png", policy=policy)


def test_sns_certificates_come_from_sns_hosts_exactly():
    for host in (
        "sns.us-east-1.amazonaws.com",
        "sns.eu-central-2.amazonaws.com",
        "sns.us-gov-west-1.amazonaws.com",
        "sns.cn-northwest-1.amazonaws.com.cn",
    ):
        assert SNS_HOST.fullmatch(host), host
    for host in (
        "sns.s3.amazonaws.com",
        "sns.s3-us-west-2.amazonaws.com",
        "sns.execute-api.us-east-1.amazonaws.com",
        "sns.us-east-1.amazonaws.com.cn",
        "sns.cn-north-1.amazonaws.com",
        "sns.us-east-1.amazonaws.com\n",
    ):
        assert not SNS_HOST.fullmatch(host), host
    verifier = SnsVerifier(("arn:aws:sns:us-east-1:1:t",), NetPolicy.from_settings(Settings()))
    with pytest.raises(SnsRefused, match="not an SNS host"):
        verifier._check_sns_url(
            "https://sns.s3.amazonaws.com/SimpleNotificationService-x.pem", "SigningCertURL"
        )


def test_webhook_retry_delays_are_jittered_within_bounds():
    settings = Settings(webhook_retry_base=15.0, webhook_retry_max_delay=1800.0)
    for attempt, ceiling in ((0, 15.0), (3, 120.0), (9, 1800.0)):
        delays = [retry_delay(settings, attempt) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays), (attempt, min(delays), max(delays))
        assert len({round(d, 3) for d in delays}) > 150, "jobs failing together retry at different times"
        assert max(delays) - min(delays) > ceiling / 4


def test_webhook_retries_of_jobs_failing_together_are_spread(gs, webhook_receiver):
    """Six jobs whose receiver fails at the same moment: each retry is booked 10..20 s after its failed
    attempt (retry base 20 s, equal jitter), at different times, not all at once. The booked times are read
    from the schedule, so the deliverer's pump and the machine's load do not blur them."""
    webhook_receiver.status_codes = [500] * 1000
    deliverer = gs.stack.start(
        ["-m", "deliverer", "--concurrency", "4"],
        "webhooks-jitter",
        {
            "BIREFNET_WEBHOOK_RETRY_BASE": "20",
            "BIREFNET_WEBHOOK_RETRY_MAX_DELAY": "20",
            "BIREFNET_WEBHOOK_MAX_RETRIES": "1",
        },
    )
    store = JobStore.from_url(gs.settings.redis_url)
    try:
        with gs.client(ALICE) as client:
            ids = [
                client.post(
                    V2, json={"model": "no such model"}, params={"fal_webhook": webhook_receiver.url}
                ).json()["request_id"]
                for _ in range(6)
            ]
        wait_for(
            lambda: all(len(list_attempts(store, rid)) == 1 for rid in ids), 60, "one failed attempt per job"
        )
        delays = []
        for rid in ids:
            due = store.redis.zscore(keys.WEBHOOK_DUE, keys.webhook_booking(rid, 1))
            assert due is not None, rid
            delays.append(due - list_attempts(store, rid)[0]["at"])
        assert all(9.9 <= delay <= 20.1 for delay in delays), delays  # half fixed, half random
        assert max(delays) - min(delays) > 0.2, delays
    finally:
        deliverer.terminate()
