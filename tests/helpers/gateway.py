"""Shared parts for the gateway tests: a private stack (devstack's builder) with real Redis, moto, worker and
webhook-deliverer subprocesses, the gateway on uvicorn in a thread (HTTP or HTTPS with a generated CA), and
API keys.

The stack is built once per test module (`GatewayStack`), because starting worker processes dominates
the run time; tests keep apart by using their own keys and request ids.
"""

from __future__ import annotations

import json
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn

from common.domain.auth import hash_secret
from common.settings import Settings
from devstack.builder import signing_seed
from devstack.services import free_port
from devstack.tls import TlsFiles, make_tls
from gateway.app import create_app
from tests.helpers.stack import Stack, build_stack, isolated_settings, wait_for

# --- keys ---
KEYS = {  # id -> secret; "alice" is scrypt-hashed (id:secret), "bob" sha256 (also usable as a bare token)
    "alice": "alice-secret",
    "bob": "bob-secret",
    "ops": "ops-secret",
}
ALICE = "alice:alice-secret"
BOB = "bob:bob-secret"
OPS = "ops:ops-secret"


def api_keys_setting(s3_read_bucket: str) -> str:
    return json.dumps(
        [
            {
                "id": "alice",
                "hash": hash_secret(KEYS["alice"], "scrypt"),
                "user_id": "user-alice",
                "s3_read": [f"{s3_read_bucket}/alice/"],
            },
            {"id": "bob", "hash": hash_secret(KEYS["bob"], "sha256")},
            {"id": "ops", "hash": hash_secret(KEYS["ops"], "sha256"), "admin": True},
        ]
    )


def auth(credential: str) -> dict[str, str]:
    return {"Authorization": f"Key {credential}"}


# --- the gateway in a thread ---
class GatewayServer:
    """uvicorn serving create_app(settings) on 127.0.0.1, in a daemon thread."""

    def __init__(self, settings: Settings, tls: TlsFiles | None = None, port: int | None = None):
        self.port = port or free_port()
        self.tls = tls
        ssl = {"ssl_certfile": str(tls.cert), "ssl_keyfile": str(tls.key)} if tls else {}
        # proxy_headers=False as `python -m gateway` runs it: the gateway alone decides which
        # X-Forwarded-* to believe (uvicorn's default would take them from any loopback peer).
        config = uvicorn.Config(
            create_app(settings),
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            access_log=False,
            proxy_headers=False,
            **ssl,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def start(self) -> GatewayServer:
        self.thread.start()
        wait_for(lambda: self.server.started, 30, "the gateway to start")
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


# --- a whole stack for one test module ---
@dataclass
class GatewayStack:
    stack: Stack
    settings: Settings
    gateway: GatewayServer

    @property
    def url(self) -> str:
        return self.gateway.url

    def client(self, credential: str | None = ALICE, headers: dict[str, str] | None = None) -> httpx.Client:
        merged = {**(auth(credential) if credential else {}), **(headers or {})}
        verify = ssl.create_default_context(cafile=str(self.gateway.tls.ca)) if self.gateway.tls else True
        return httpx.Client(base_url=self.url, headers=merged, timeout=30, verify=verify)

    def wait_status(
        self, request_id: str, status: str = "COMPLETED", credential: str = ALICE, timeout: float = 60
    ) -> dict:
        with self.client(credential) as client:

            def current() -> dict | None:
                body = client.get(f"/queue/fal-ai/birefnet/requests/{request_id}/status").json()
                return body if body.get("status") == status else None

            return wait_for(current, timeout, f"{request_id} to be {status}", interval=0.05)

    def close(self) -> None:
        self.gateway.stop()
        self.stack.stop_all()


def start_gateway_stack(
    redis_port: int,
    moto_endpoint: str,
    log_dir: Path,
    *,
    tls: bool = False,
    workers: tuple[str, ...] = ("general-light",),
    extra: dict[str, str] | None = None,
    webhooks: bool = True,
) -> GatewayStack:
    suffix, redis_url, values = isolated_settings(redis_port, log_dir)
    values |= {
        "BIREFNET_GATEWAY_API_KEYS": api_keys_setting(f"in-{suffix}"),
        # Image servers, S3 and webhook receivers live on 127.0.0.1 here (the SSRF guard refuses it
        # otherwise).
        "BIREFNET_FETCH_ALLOW_NETWORKS": "127.0.0.0/8",
        "BIREFNET_FETCH_ALLOWED_PORTS": "*",
        "BIREFNET_GATEWAY_SWEEP_INTERVAL": "0.2",
        # Tests speak to the gateway from 127.0.0.1, a trusted proxy by default: X-Forwarded-* count when on.
        "BIREFNET_GATEWAY_TRUST_FORWARDED": "true",
        "BIREFNET_WEBHOOK_SIGNING_KEYS": f"{signing_seed()},{signing_seed()}",  # two: JWKS rotation
        "BIREFNET_WEBHOOK_RETRY_BASE": "0.2",
        "BIREFNET_WEBHOOK_RETRY_MAX_DELAY": "0.5",
        "BIREFNET_WEBHOOK_MAX_RETRIES": "3",
        # Workers run the network at 256x256 whatever the request says (logged): jobs take a fraction of a
        # second.
        "BIREFNET_TEST_OPERATING_RESOLUTION": "256x256",
        **(extra or {}),
    }
    stack = build_stack(redis_url, moto_endpoint, values, queue_name=f"events-{suffix}")
    settings = stack.settings
    tls_files = make_tls(log_dir) if tls else None
    gateway = GatewayServer(settings, tls_files).start()
    result = GatewayStack(stack=stack, settings=settings, gateway=gateway)
    try:
        if webhooks:
            stack.start_deliverer(concurrency=2)
        for variants in workers:
            stack.start_worker(variants)
    except BaseException:
        result.close()
        raise
    return result
