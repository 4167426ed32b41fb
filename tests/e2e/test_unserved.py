"""A request for a model that no live worker serves says so while it waits, and `ops status` shows it.

Real Redis, moto, gateway (HTTP) and worker processes; `python -m ops status` runs as a subprocess.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers.gateway import GatewayStack, start_gateway_stack
from tests.helpers.images import data_uri, png_bytes
from tests.helpers.stack import ROOT, wait_for

IMAGE = data_uri(png_bytes((48, 32)))
WAITING = "no worker serves General Use (Light) right now; waiting"


@pytest.fixture
def gs(redis_server, moto_endpoint, tmp_path) -> GatewayStack:
    stack = start_gateway_stack(redis_server.port, moto_endpoint, tmp_path, workers=(), webhooks=False)
    yield stack
    stack.close()


def ops_status(gs: GatewayStack, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ops", "status", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**gs.stack.env, "COLUMNS": "200"},
        timeout=60,
    )


@pytest.mark.timeout(300)
def test_waiting_request_for_an_unserved_model_says_so_until_a_worker_takes_it(gs: GatewayStack):
    with gs.client() as client:
        # The endpoints' default model, General Use (Light): no worker runs it yet.
        submitted = client.post("/queue/fal-ai/birefnet/v2", json={"image_url": IMAGE}).json()
        rid = submitted["request_id"]

        def waiting_logs() -> list[dict] | None:
            body = client.get(f"/queue/fal-ai/birefnet/requests/{rid}/status", params={"logs": 1}).json()
            assert body["status"] == "IN_QUEUE"
            hits = [e for e in body["logs"] or [] if e["message"].startswith(WAITING)]
            return hits or None

        hits = wait_for(waiting_logs, 30, "the no-worker line in the status logs")
        assert hits[0]["level"] == "WARN" and "general-light" in hits[0]["message"]

        status = ops_status(gs, "--json")
        assert status.returncode == 0, status.stderr
        unserved = json.loads(status.stdout)["unserved_variants"]
        assert [(u["variant"], u["model"], u["waiting_jobs"]) for u in unserved] == [
            ("general-light", "General Use (Light)", 1)
        ]
        table = ops_status(gs).stdout
        assert "NO WORKER" in table and "no worker serves General Use (Light) (general-light)" in table

        # The line is written once, however many sweeps (0.2 s apart here) pass while it waits.
        gs.stack.start_worker("general-light")
        done = gs.wait_status(rid, timeout=120)
        assert not done.get("error")
        logs = client.get(f"/queue/fal-ai/birefnet/requests/{rid}/status", params={"logs": 1}).json()["logs"]
        assert sum(e["message"].startswith(WAITING) for e in logs) == 1
        assert client.get(f"/queue/fal-ai/birefnet/requests/{rid}").json()["image"]["url"]

        # With the worker up, a new request gets no such line, and ops shows nothing unserved.
        second = client.post("/queue/fal-ai/birefnet/v2", json={"image_url": IMAGE}).json()["request_id"]
        gs.wait_status(second, timeout=120)
        logs = client.get(f"/queue/fal-ai/birefnet/requests/{second}/status", params={"logs": 1}).json()[
            "logs"
        ]
        assert not any(e["message"].startswith("no worker serves") for e in logs)
        assert json.loads(ops_status(gs, "--json").stdout)["unserved_variants"] == []
