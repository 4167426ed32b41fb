"""The one stack builder of the tests: settings for a private set of service processes, and those processes.

A stack's environment lives in `Stack.env` and reaches its subprocesses only through it (devstack's
launcher); the test process's `os.environ` gets nothing of it (only moto's dummy AWS credentials, from
conftest). The test process gets the same values as `Stack.settings`. Feature stacks (the gateway stack in
tests/helpers/gateway.py, the chaos stack in tests/helpers/chaos_tools.py) are built with `build_stack`
and add their own parts around it.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import redis

from common.settings import Settings
from devstack.services import (
    ROOT,
    provision_aws,
    settings_from,
    spawn_python,
    stack_environment,
    stop_processes,
)

__all__ = ["ROOT", "TEST_VARIANTS", "Stack", "build_stack", "isolated_settings", "settings_from", "wait_for"]

# Tests run the nano architecture with recipe weights: fast on CPU, same code path as real checkpoints.
TEST_VARIANTS = {
    "general-light": {"backbone": "swin_v1_nano", "weights": "recipe"},
    "general-heavy": {"backbone": "swin_v1_nano", "weights": "recipe"},
}


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
        # A test stack is a development stack: signing keys generated into its Redis are fine.
        "BIREFNET_ALLOW_DEV_SECRETS": "true",
    }


@dataclass
class Stack:
    """Settings and environment of one private stack, and the service processes started with them."""

    settings: Settings
    env: dict[str, str]
    processes: list[subprocess.Popen] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    @property
    def log_dir(self) -> Path:
        return Path(self.env["BIREFNET_TEST_LOG_DIR"])

    def start(self, args: list[str], name: str, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
        log_path = self.log_dir / f"{name}.log"
        proc = spawn_python(args, {**self.env, **(extra_env or {})}, log_path)
        self.processes.append(proc)
        self.logs.append(log_path)
        return proc

    def start_worker(self, variants: str = "general-light", name: str | None = None,
                     extra_env: dict[str, str] | None = None, wait: bool = True) -> subprocess.Popen:
        name = name or f"worker-{variants}-{len(self.processes)}"
        ready = self.log_dir / f"{name}.ready"
        # the worker's own entry point, with the testing-only hooks installed (tests/helpers/hooked_worker.py)
        proc = self.start(["-m", "tests.helpers.hooked_worker", "--variants", variants], name,
                          {"BIREFNET_READY_FILE": str(ready), **(extra_env or {})})
        if wait:
            wait_for(lambda: ready.exists() or proc.poll() is not None, 120, f"worker {name} ready")
            assert proc.poll() is None, self.tail(name)
        return proc

    def tail(self, name: str, lines: int = 60) -> str:
        path = self.log_dir / f"{name}.log"
        return "\n".join(path.read_text().splitlines()[-lines:]) if path.exists() else ""

    def stop_all(self) -> None:
        stop_processes(self.processes)


def build_stack(redis_url: str, s3_url: str, values: dict[str, str], *, queue_name: str,
                sqs_url: str | None = None) -> Stack:
    """Environment (`values` over the test process's own), settings, buckets and event queue of one stack.
    `values` must hold BIREFNET_TEST_LOG_DIR; `sqs_url` (default: `s3_url`) lets S3 go through a proxy."""
    env = stack_environment(os.environ, redis_url, s3_url, values)
    env["BIREFNET_SQS_ENDPOINT_URL"] = sqs_url or s3_url
    settings = settings_from(env)
    queue = provision_aws(settings, env, queue_name=queue_name)
    env["BIREFNET_SQS_QUEUE_URL"] = queue.queue_url
    return Stack(settings=settings.model_copy(update={"sqs_queue_url": queue.queue_url}), env=env)
