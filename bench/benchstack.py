"""What the stack benchmarks share: the CPU's name, health probes, and a loopback stack of Redis, moto S3,
one `python -m worker` and `python -m gateway` with one API key (`KEY`)."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from common.domain.auth import hash_secret
from common.state.jobs import JobRecord, JobStore
from devstack.services import (
    MotoServer,
    RedisServer,
    free_port,
    provision_aws,
    settings_from,
    spawn_python,
    stack_environment,
    stop_processes,
)

KEY = "bench:bench-secret"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def wait(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.1)


def completed(client: httpx.Client, store: JobStore, path: str, body: dict,
              poll: float = 0.01) -> tuple[JobRecord, float, float]:
    """Submit and poll the status every `poll` s until COMPLETED: (record, seconds of the submit call,
    seconds submit → COMPLETED seen); the job must have succeeded."""
    started = time.perf_counter()
    response = client.post(path, json=body)
    response.raise_for_status()
    submitted = time.perf_counter()
    rid = response.json()["request_id"]
    while client.get(f"/queue/fal-ai/birefnet/requests/{rid}/status").json()["status"] != "COMPLETED":
        time.sleep(poll)
    total = time.perf_counter() - started
    record = store.get(rid)
    assert record is not None and record.error is None, record and (record.error, record.result)
    return record, submitted - started, total


@dataclass
class BenchStack:
    url: str
    port: int
    store: JobStore


@contextlib.contextmanager
def worker_and_gateway(name: str, backbone: str, values: dict[str, str], worker_timeout: float) -> Iterator[BenchStack]:
    """The stack with one general-light worker on `backbone` (recipe weights); `values` go over its settings."""
    logs = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    port = free_port()
    with RedisServer(appendonly=False) as redis_server, MotoServer() as moto:
        env = stack_environment(os.environ, redis_server.url, moto.url, {
            "BIREFNET_VARIANT_OVERRIDES": json.dumps({"general-light": {"backbone": backbone, "weights": "recipe"}}),
            "BIREFNET_WEIGHTS_FALLBACK": "none",
            "BIREFNET_READY_FILE": str(logs / "worker.ready"),
            "BIREFNET_GATEWAY_HOST": "127.0.0.1",
            "BIREFNET_GATEWAY_PORT": str(port),
            "BIREFNET_GATEWAY_API_KEYS": json.dumps([{"id": "bench", "hash": hash_secret("bench-secret")}]),
            "BIREFNET_WORKER_METRICS_PORT": "0",
            "BIREFNET_ALLOW_DEV_SECRETS": "true",  # a throwaway stack: keys generated into its Redis
            **values,
        })
        settings = settings_from(env)
        provision_aws(settings, env)
        processes = [spawn_python(["-m", "worker", "--variants", "general-light"], env, logs / "worker.log"),
                     spawn_python(["-m", "gateway"], env, logs / "gateway.log")]
        try:
            wait(lambda: (logs / "worker.ready").exists(), worker_timeout, "the worker")
            url = f"http://127.0.0.1:{port}"
            wait(lambda: healthy(url), 60, "the gateway")
            yield BenchStack(url, port, JobStore.from_url(settings.redis_url))
        finally:
            stop_processes(processes)
