"""Load, CI size: LOAD_JOBS (default 100) requests through the gateway with two workers on the nano model.
All complete, each with exactly one webhook; throughput and latency are printed (run with -s to see them).
`python bench/bench_load.py` runs the full 1000.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from devstack.load import run_load
from devstack.receiver import WebhookReceiver
from tests.helpers.faults import ChaosStack

LOAD_JOBS = int(os.environ.get("LOAD_JOBS", "100"))


@pytest.mark.slow  # full size under `make chaos` (CHAOS_JOBS / LOAD_JOBS)
@pytest.mark.timeout(600)
def test_load_every_job_completes_once(moto_endpoint: str, tmp_path: Path):
    stack = ChaosStack(tmp_path, moto_endpoint, s3_proxy=False)
    receiver = WebhookReceiver().start()
    try:
        stack.start(workers=2, producer=False)
        figures = run_load(stack, receiver, LOAD_JOBS, concurrency=8)
    finally:
        stack.close()
        receiver.stop()
    print("load figures:", json.dumps(figures))
    assert figures["ok"] == LOAD_JOBS
    assert figures["webhooks_per_job"] == [(1, LOAD_JOBS)], "exactly one webhook per job"
    assert figures["throughput"] > 0.5, "two workers on the nano model do several jobs a second"
    assert figures["latency"]["p95"] <= figures["seconds"] + 1
