"""Mask reuse against a full job: what a new background costs when the network does not run again.

Starts a private stack on loopback (redis-server, moto S3, one `python -m worker`, `python -m producer.gateway`
with an API key) and, for one photo-sized input (`--size`, default 1024x768), measures submit → COMPLETED
(client side, status polled every 10 ms) and the worker's own time (claim → completion) for:

1. **full job**: new image bytes every time (one pixel changed), so the content cache misses and the network
   runs at the operating resolution;
2. **cache hit**: the same bytes again, a new request (content cache);
3. **compose (queue)**: `POST .../requests/{id}/compose` from the first full job's kept mask;
4. **compose (run)**: `POST /run/.../requests/{id}/compose`, the caller's wall time.

Every request asks for the same rendering (a background colour, PNG), so the rows differ only in where the
mask comes from. Recipe weights (the network's cost does not depend on the values). Prints a markdown table.

    python bench/bench_compose.py [--backbone swin_v1_t] [--resolution 1024x1024] [--repeats 3]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from common.domain.auth import hash_secret
from common.settings import Settings
from common.state.jobs import JobStore
from devstack.services import MotoServer, RedisServer, free_port, provision_aws, stack_environment

ROOT = Path(__file__).resolve().parent.parent
KEY = "bench:bench-secret"
REQ = "/queue/fal-ai/birefnet/requests"
OPTIONS = {"background_color": "#f4e1c1", "output_format": "png"}


def photo(size: tuple[int, int], variant: int) -> str:
    from skimage import data as samples

    image = Image.fromarray(samples.chelsea()).resize(size, Image.Resampling.BICUBIC)
    pixels = np.asarray(image).copy()
    pixels[0, 0, 0] = variant % 256  # new bytes: a content-cache miss
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def cpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=open(log, "w"),  # noqa: SIM115
                            stderr=subprocess.STDOUT)


def wait(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.1)


def timed(client: httpx.Client, store: JobStore, path: str, body: dict) -> tuple[str, float, float]:
    """(request id, client seconds submit → COMPLETED, worker seconds claim → completion)."""
    started = time.perf_counter()
    response = client.post(path, json=body)
    response.raise_for_status()
    rid = response.json()["request_id"]
    while client.get(f"{REQ}/{rid}/status").json()["status"] != "COMPLETED":
        time.sleep(0.01)
    total = time.perf_counter() - started
    record = store.get(rid)
    assert record is not None and record.error is None, record and (record.error, record.result)
    return rid, total, (record.completed_at or 0) - (record.started_at or 0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backbone", default="swin_v1_t", help="swin_v1_t (BiRefNet_lite), swin_v1_l, swin_v1_nano")
    parser.add_argument("--resolution", default="1024x1024", help="operating resolution of the full jobs")
    parser.add_argument("--size", default="1024x768", help="input image WxH")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    logs = Path(tempfile.mkdtemp(prefix="bench-compose-"))
    port = free_port()
    with RedisServer(appendonly=False) as redis_server, MotoServer() as moto:
        env = stack_environment(redis_server.url, moto.url, "", {
            "BIREFNET_VARIANT_OVERRIDES": json.dumps({"general-light": {"backbone": args.backbone,
                                                                        "weights": "recipe"}}),
            "BIREFNET_WEIGHTS_FALLBACK": "none",
            "BIREFNET_READY_FILE": str(logs / "worker.ready"),
            "BIREFNET_GATEWAY_HOST": "127.0.0.1",
            "BIREFNET_GATEWAY_PORT": str(port),
            "BIREFNET_GATEWAY_API_KEYS": json.dumps([{"id": "bench", "hash": hash_secret("bench-secret")}]),
            "BIREFNET_WORKER_METRICS_PORT": "0",
            "BIREFNET_TEST_OPERATING_RESOLUTION": "" if args.resolution == "1024x1024" else args.resolution,
        })
        os.environ.update({k: v for k, v in env.items() if k.startswith(("BIREFNET_", "AWS_"))})
        settings = Settings()
        provision_aws(settings)
        processes = [spawn(["-m", "worker", "--variants", "general-light"], env, logs / "worker.log"),
                     spawn(["-m", "producer.gateway"], env, logs / "gateway.log")]
        rows: dict[str, list[tuple[float, float]]] = {"full": [], "cache": [], "compose": [], "run": []}
        try:
            wait(lambda: (logs / "worker.ready").exists(), 600, "the worker")
            url = f"http://127.0.0.1:{port}"
            wait(lambda: _up(url), 60, "the gateway")
            store = JobStore.from_url(settings.redis_url)
            with httpx.Client(base_url=url, headers={"Authorization": f"Key {KEY}"}, timeout=600) as client:
                v2 = "/queue/fal-ai/birefnet/v2"
                source, _, _ = timed(client, store, v2, {"image_url": photo(size, 1), **OPTIONS})  # warm-up
                timed(client, store, f"{REQ}/{source}/compose", OPTIONS)
                for n in range(args.repeats):
                    image = photo(size, 10 + n)
                    rows["full"].append(timed(client, store, v2, {"image_url": image, **OPTIONS})[1:])
                    rows["cache"].append(timed(client, store, v2, {"image_url": image, **OPTIONS})[1:])
                    rows["compose"].append(timed(client, store, f"{REQ}/{source}/compose", OPTIONS)[1:])
                    started = time.perf_counter()
                    response = client.post(f"/run/fal-ai/birefnet/requests/{source}/compose", json=OPTIONS)
                    response.raise_for_status()
                    rows["run"].append((time.perf_counter() - started, float("nan")))
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                process.wait(timeout=20)

    print(f"compose benchmark: {cpu_model()}, {os.cpu_count()} CPUs, {args.backbone} (recipe weights) at "
          f"{args.resolution} on CPU, {args.size} PNG input, background colour + PNG output, "
          f"median of {args.repeats}\n")
    print("| request | submit → COMPLETED | worker | vs full job |")
    print("| --- | ---: | ---: | ---: |")
    full = statistics.median(total for total, _ in rows["full"])
    labels = {"full": "full job (network runs)", "cache": "same bytes again (content cache)",
              "compose": "compose, queue", "run": "compose, /run (sync)"}
    for name, label in labels.items():
        total = statistics.median(t for t, _ in rows[name])
        workers = [w for _, w in rows[name] if w == w]
        worker = f"{statistics.median(workers):.3f} s" if workers else "–"
        print(f"| {label} | {total:.3f} s | {worker} | {total / full:.2f}× |")


def _up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


if __name__ == "__main__":
    main()
