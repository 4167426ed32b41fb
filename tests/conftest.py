"""Real services for the tests: redis-server, moto's S3+SQS server, worker subprocesses, HTTP receivers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from common.settings import Settings
from devstack.receiver import WebhookReceiver
from devstack.services import MotoServer, RedisServer, provision_aws, stack_environment

ROOT = Path(__file__).resolve().parent.parent

# Tests run the nano architecture with recipe weights: fast on CPU, same code path as real checkpoints.
TEST_VARIANTS = {
    "general-light": {"backbone": "swin_v1_nano", "weights": "recipe"},
    "general-heavy": {"backbone": "swin_v1_nano", "weights": "recipe"},
}


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    with MotoServer() as server:
        yield server.url


@dataclass
class Stack:
    settings: Settings
    env: dict[str, str]
    processes: list[subprocess.Popen] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    def start(self, args: list[str], name: str, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
        log_path = Path(self.env["BIREFNET_TEST_LOG_DIR"]) / f"{name}.log"
        handle = open(log_path, "w")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env={**self.env, **(extra_env or {})},
                                stdout=handle, stderr=subprocess.STDOUT)
        self.processes.append(proc)
        self.logs.append(log_path)
        return proc

    def start_worker(self, variants: str = "general-light", name: str | None = None,
                     extra_env: dict[str, str] | None = None, wait: bool = True) -> subprocess.Popen:
        name = name or f"worker-{variants}-{len(self.processes)}"
        ready = Path(self.env["BIREFNET_TEST_LOG_DIR"]) / f"{name}.ready"
        proc = self.start(["-m", "worker", "--variants", variants], name,
                          {"BIREFNET_READY_FILE": str(ready), **(extra_env or {})})
        if wait:
            wait_for(lambda: ready.exists() or proc.poll() is not None, 120, f"worker {name} ready")
            assert proc.poll() is None, self.tail(name)
        return proc

    def tail(self, name: str, lines: int = 60) -> str:
        path = Path(self.env["BIREFNET_TEST_LOG_DIR"]) / f"{name}.log"
        return "\n".join(path.read_text().splitlines()[-lines:]) if path.exists() else ""

    def stop_all(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.processes:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def isolated_settings(redis_port: int, log_dir: Path) -> tuple[str, str, dict[str, str]]:
    """A fresh Redis database, bucket names and fast timings for one test's processes:
    (name suffix, Redis URL, BIREFNET_* environment)."""
    import redis

    suffix = uuid.uuid4().hex[:8]
    db = int(suffix, 16) % 15 + 1  # spread tests over Redis databases 1..15
    redis_url = f"redis://127.0.0.1:{redis_port}/{db}"
    redis.Redis.from_url(redis_url).flushdb()
    return suffix, redis_url, {
        "BIREFNET_INPUT_BUCKET": f"in-{suffix}",
        "BIREFNET_OUTPUT_BUCKET": f"out-{suffix}",
        "BIREFNET_VARIANT_OVERRIDES": json.dumps(TEST_VARIANTS),
        "BIREFNET_WEIGHTS_FALLBACK": "none",
        "BIREFNET_VISIBILITY_TIMEOUT": "10",
        "BIREFNET_UNACKED_RESTORE_INTERVAL": "1",
        "BIREFNET_JOB_LEASE_SECONDS": "6",
        "BIREFNET_SQS_WAIT_SECONDS": "1",
        "BIREFNET_TORCH_THREADS": "1",
        # Tests send the same few images again and again: without this, most would reuse a cached mask and not
        # exercise the network path they are about (tests/test_beyond_fal.py turns the cache on).
        "BIREFNET_MASK_CACHE_SECONDS": "0",
        # Test servers (webhook receivers, image servers) listen on loopback; production refuses it.
        "BIREFNET_FETCH_ALLOW_NETWORKS": "127.0.0.1/32",
        "BIREFNET_FETCH_ALLOWED_PORTS": "*",
        # Tests may run several workers at once: no fixed metrics ports (tests that scrape set their own).
        "BIREFNET_WORKER_METRICS_PORT": "0",
        "BIREFNET_PRODUCER_METRICS_PORT": "0",
        "BIREFNET_WEBHOOKS_METRICS_PORT": "0",
        "BIREFNET_TEST_LOG_DIR": str(log_dir),
    }


@pytest.fixture
def stack(redis_server: RedisServer, moto_endpoint: str, tmp_path: Path) -> Iterator[Stack]:
    """Fresh buckets, event queue and Redis database for one test; processes are the test's to start."""
    suffix, redis_url, extra = isolated_settings(redis_server.port, tmp_path)
    env = stack_environment(redis_url, moto_endpoint, "", extra)
    os.environ.update({k: v for k, v in env.items() if k.startswith(("BIREFNET_", "AWS_"))})
    settings = Settings()
    provisioned = provision_aws(settings, queue_name=f"events-{suffix}")
    env["BIREFNET_SQS_QUEUE_URL"] = provisioned.queue_url
    os.environ["BIREFNET_SQS_QUEUE_URL"] = provisioned.queue_url
    settings = Settings()
    result = Stack(settings=settings, env=env)
    yield result
    result.stop_all()
    for key in list(os.environ):
        if key.startswith("BIREFNET_"):
            del os.environ[key]


@pytest.fixture
def webhook_receiver() -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver().start()
    yield receiver
    receiver.stop()
