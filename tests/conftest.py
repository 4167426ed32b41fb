"""Real services for the tests: redis-server, moto's S3+SQS server, a private stack per test, HTTP receivers.

Shared helpers live in tests/helpers; this file holds only fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.receiver import WebhookReceiver
from devstack.services import MotoServer, RedisServer
from tests.helpers.stack import Stack, build_stack, isolated_settings

# Every stack the tests start is a development stack: it may generate its signing keys into its own Redis
# (production settings refuse that). Set for this process and inherited by every process it starts.
os.environ.setdefault("BIREFNET_ALLOW_DEV_SECRETS", "true")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    # The test process's own boto3 clients (tests, the gateway in a thread) use moto's dummy credentials
    # unless it has some; its subprocesses get theirs from Stack.env.
    with MotoServer() as server, pytest.MonkeyPatch.context() as patch:
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            patch.setenv(key, os.environ.get(key, "testing"))
        yield server.url


@pytest.fixture
def stack(redis_server: RedisServer, moto_endpoint: str, tmp_path: Path) -> Iterator[Stack]:
    """Fresh buckets, event queue and Redis database for one test; processes are the test's to start."""
    suffix, redis_url, values = isolated_settings(redis_server.port, tmp_path)
    result = build_stack(redis_url, moto_endpoint, values, queue_name=f"events-{suffix}")
    yield result
    result.stop_all()


@pytest.fixture
def webhook_receiver() -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver().start()
    yield receiver
    receiver.stop()
