"""Nobody hogs: one key floods the gateway, another keeps its latency.

Real processes (`python -m gateway`, two `python -m worker` on the nano model at 128², redis-server,
moto). The flooding key has `max_concurrent: 1`; its client submits from several threads as fast as the
gateway answers. The other key sends one request at a time and measures submit -> COMPLETED, first without
the flood, then with it (same run, same machine). Its p95 must stay within 1.5x, and every accepted request
of both keys must complete. Size: FAIRNESS_JOBS requests of the measured key per phase (CI 10; `make chaos`
more).

What the limit controls is scheduling: how long a request waits for a worker. So that the premise holds on any
machine, every job holds its worker for a set time in its image download (a test file server answers after
HOLD seconds), as a GPU job holds its own GPU; the nano forward at 128² adds a fraction of that. Without the
hold, two CPU forwards at once on a small shared machine slow each other down whatever the scheduler does.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from pathlib import Path

import httpx
import pytest

from common.domain.auth import hash_secret
from devstack.load import V2, percentile
from tests.helpers.faults import ChaosStack
from tests.helpers.images import small_png
from tests.helpers.servers import FileServer
from tests.helpers.stack import wait_for

JOBS = int(os.environ.get("FAIRNESS_JOBS", "10"))
HOLD = 1.0  # seconds each job spends in its download
FLOOD_THREADS = 4
KEYS = {"flood": "flood-secret", "steady": "steady-secret"}


def keys_setting() -> str:
    return json.dumps(
        [
            {"id": "flood", "hash": hash_secret(KEYS["flood"], "sha256"), "max_concurrent": 1},
            {"id": "steady", "hash": hash_secret(KEYS["steady"], "sha256")},
        ]
    )


def client(stack: ChaosStack, key: str) -> httpx.Client:
    return httpx.Client(
        base_url=stack.gateway_url, headers={"Authorization": f"Key {key}:{KEYS[key]}"}, timeout=30
    )


def one_at_a_time(stack: ChaosStack, image_url: str, count: int) -> tuple[list[float], list[float]]:
    """Submit -> COMPLETED and submit -> started (s) of `count` requests sent one after another by the
    steady key."""
    store = stack.store()
    latencies = []
    waits = []
    with client(stack, "steady") as http:
        for _ in range(count):
            sent = time.time()
            response = http.post(V2, json={"image_url": image_url})
            assert response.status_code == 200, response.text
            rid = response.json()["request_id"]
            record = wait_for(
                lambda rid=rid: (r := store.get(rid)) and r.status == "COMPLETED" and r,
                120,
                f"{rid} to complete",
                interval=0.01,
            )
            assert record.ok, record.error
            latencies.append(record.completed_at - sent)
            waits.append(record.started_at - sent)
    store.redis.close()
    return latencies, waits


def flood(
    stack: ChaosStack, image_url: str, stop: threading.Event, accepted: list[str], refused: list[int]
) -> None:
    """Submit without pause; on 429 retry as fal's Python client does (0.1 s doubling, jittered), but give up
    backing off at 0.5 s (fal's client: 30 s) and never stop."""
    rng = random.Random(threading.get_ident())
    with client(stack, "flood") as http:
        tries = 0
        while not stop.is_set():
            response = http.post(V2, json={"image_url": image_url})
            if response.status_code == 200:
                accepted.append(response.json()["request_id"])
                tries = 0
            else:
                assert response.status_code == 429 and response.headers["retry-after"], response.text
                refused.append(1)
                tries += 1
                time.sleep(min(0.5, 0.1 * 2 ** (tries - 1)) * rng.uniform(0.5, 1.5))


@pytest.mark.slow  # `make chaos` runs more requests per phase
@pytest.mark.timeout(600)
def test_a_flooding_key_does_not_slow_another_key_down(moto_endpoint: str, tmp_path: Path):
    stack = ChaosStack(
        tmp_path, moto_endpoint, s3_proxy=False, overrides={"BIREFNET_GATEWAY_API_KEYS": keys_setting()}
    )
    files = FileServer(
        {"/steady.png": (small_png(1), "image/png"), "/flood.png": (small_png(2), "image/png")},
        delays={"/steady.png": HOLD, "/flood.png": HOLD},
    )
    steady_url, flood_url = files.url("/steady.png"), files.url("/flood.png")
    try:
        stack.start(workers=2, producer=False, webhooks=False)
        one_at_a_time(stack, steady_url, 2)  # both workers' first forward out of the measurement
        baseline, baseline_waits = one_at_a_time(stack, steady_url, JOBS)
        stop, accepted, refused = threading.Event(), [], []
        threads = [
            threading.Thread(target=flood, args=(stack, flood_url, stop, accepted, refused), daemon=True)
            for _ in range(FLOOD_THREADS)
        ]
        for thread in threads:
            thread.start()
        try:
            wait_for(lambda: len(refused) > 10, 60, "the flood to hit its limit")
            flooded, flooded_waits = one_at_a_time(stack, steady_url, JOBS)
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=60)
        store = stack.store()
        wait_for(lambda: all(store.status(rid) == "COMPLETED" for rid in accepted), 120, "the flood's jobs")
        flood_ok = sum(store.get(rid).ok for rid in accepted)
        store.redis.close()
    finally:
        stack.close()
        files.stop()
    figures = {
        "jobs_per_phase": JOBS,
        "baseline_p95": round(percentile(baseline, 95), 3),
        "baseline_p50": round(percentile(baseline, 50), 3),
        "flooded_p95": round(percentile(flooded, 95), 3),
        "flooded_p50": round(percentile(flooded, 50), 3),
        "flood_accepted": len(accepted),
        "flood_refused_429": len(refused),
        "baseline_wait_p95": round(percentile(baseline_waits, 95), 3),
        "flooded_wait_p95": round(percentile(flooded_waits, 95), 3),
    }
    figures["p95_ratio"] = round(figures["flooded_p95"] / figures["baseline_p95"], 2)
    print(
        "fairness figures:",
        json.dumps(figures),
        "baseline",
        [round(x, 2) for x in baseline],
        "flooded",
        [round(x, 2) for x in flooded],
    )
    assert flood_ok == len(accepted) > 0, "every accepted request of the flooding key completes"
    assert figures["flooded_p95"] <= 1.5 * figures["baseline_p95"], figures
