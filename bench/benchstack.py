"""What the stack benchmarks share: the CPU's name, health probes, and a loopback stack (devstack's builder)
of Redis, moto S3, one `python -m worker` and `python -m gateway` with one API key (`KEY`)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
from PIL import Image

from common.domain.auth import hash_secret
from common.state.jobs import JobRecord, JobStore
from devstack.builder import build_stack, wait_for
from devstack.services import MotoServer, RedisServer, free_port

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
    wait_for(predicate, timeout, what)


def auth(credential: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Key {credential}"}


def png_128(seed: int) -> bytes:
    """A distinct ~128x128 picture per job."""
    color = ((seed * 37) % 256, (seed * 91) % 256, (seed * 53) % 256)
    image = Image.new("RGB", (128, 128), color)
    image.paste((255 - color[0], 255 - color[1], 255 - color[2]), (24 + seed % 16, 20, 96, 100))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def completed(
    client: httpx.Client, store: JobStore, path: str, body: dict, poll: float = 0.01
) -> tuple[JobRecord, float, float]:
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
def worker_and_gateway(
    name: str, backbone: str, values: dict[str, str], worker_timeout: float
) -> Iterator[BenchStack]:
    """The stack with one general-light worker on `backbone` (recipe weights); `values` go over its
    settings."""
    logs = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    port = free_port()
    with RedisServer(appendonly=False) as redis_server, MotoServer() as moto:
        stack = build_stack(
            redis_server.url,
            moto.url,
            {
                "BIREFNET_VARIANT_OVERRIDES": json.dumps(
                    {"general-light": {"backbone": backbone, "weights": "recipe"}}
                ),
                "BIREFNET_WEIGHTS_FALLBACK": "none",
                "BIREFNET_GATEWAY_HOST": "127.0.0.1",
                "BIREFNET_GATEWAY_PORT": str(port),
                "BIREFNET_GATEWAY_API_KEYS": json.dumps(
                    [{"id": "bench", "hash": hash_secret("bench-secret")}]
                ),
                "BIREFNET_WORKER_METRICS_PORT": "0",
                "BIREFNET_ALLOW_DEV_SECRETS": "true",  # a throwaway stack: keys generated into its Redis
                **values,
            },
            log_dir=logs,
            environ=os.environ,
        )
        try:
            stack.start_worker("general-light", name="worker", wait=False)
            stack.start_gateway()
            stack.wait_ready("worker", worker_timeout)
            url = f"http://127.0.0.1:{port}"
            wait(lambda: healthy(url), 60, "the gateway")
            yield BenchStack(url, port, JobStore.from_url(stack.settings.redis_url))
        finally:
            stack.stop_all()
