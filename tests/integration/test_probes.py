"""Liveness and readiness of the gateway, the SQS producer and the webhook deliverer against a real Redis that
goes away, and the gateway's request (RED) metrics. Liveness must not depend on Redis (a Redis restart must
not restart every pod); readiness must."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from prometheus_client import REGISTRY, generate_latest

from devstack.services import RedisServer, free_port
from tests.helpers.gateway import GatewayServer
from tests.helpers.metrics import sample
from tests.helpers.stack import build_stack, isolated_settings, wait_for


def status(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.HTTPError:
        return None


@pytest.mark.timeout(180)
def test_liveness_survives_a_redis_outage_and_readiness_follows_it(moto_endpoint: str, tmp_path: Path):
    with RedisServer() as redis_server:
        suffix, redis_url, values = isolated_settings(redis_server.port, tmp_path)
        stack = build_stack(redis_url, moto_endpoint, values, queue_name=f"events-{suffix}")
        producer_port, hooks_port = free_port(), free_port()
        stack.start(
            ["-m", "producer", "sqs"], "producer", {"BIREFNET_PRODUCER_METRICS_PORT": str(producer_port)}
        )
        stack.start(
            ["-m", "deliverer", "--concurrency", "1"],
            "webhooks",
            {"BIREFNET_WEBHOOKS_METRICS_PORT": str(hooks_port)},
        )
        gateway = GatewayServer(stack.settings).start()
        live = [
            f"{gateway.url}/livez",
            f"http://127.0.0.1:{producer_port}/healthz",
            f"http://127.0.0.1:{hooks_port}/healthz",
        ]
        ready = [
            f"{gateway.url}/readyz",
            f"http://127.0.0.1:{producer_port}/readyz",
            f"http://127.0.0.1:{hooks_port}/readyz",
        ]
        try:
            for url in live + ready:
                wait_for(lambda url=url: status(url) == 200, 60, f"{url} to answer 200")
            assert httpx.get(f"http://127.0.0.1:{producer_port}/metrics").text.count(
                "birefnet_producer_events"
            )
            assert "birefnet_webhook_deliveries" in httpx.get(f"http://127.0.0.1:{hooks_port}/metrics").text

            redis_server.stop()
            for url in ready:
                wait_for(lambda url=url: status(url) == 503, 30, f"{url} to answer 503 without Redis")
            for url in live:
                assert status(url) == 200, f"{url}: liveness must not depend on Redis"
        finally:
            gateway.stop()
            stack.stop_all()


@pytest.mark.timeout(120)
def test_gateway_counts_requests_by_route_template(redis_server, moto_endpoint: str, tmp_path: Path):
    suffix, redis_url, values = isolated_settings(redis_server.port, tmp_path)
    stack = build_stack(redis_url, moto_endpoint, values, queue_name=f"events-{suffix}")
    gateway = GatewayServer(stack.settings).start()
    route = "/queue/fal-ai/birefnet/requests/{request_id}/status"
    try:

        def count(**labels: str) -> float:
            return sample(generate_latest(REGISTRY).decode(), "birefnet_http_requests_total", **labels) or 0.0

        # Per status: other tests in this process may have counted this route already.
        before = {status: count(route=route, method="GET", status=status) for status in ("202", "401", "404")}
        with httpx.Client(base_url=gateway.url, timeout=10) as client:
            # Root-level and trailing-slash forms reach the same route: one template, whatever the raw path.
            codes = {
                client.get(path).status_code
                for path in (
                    "/fal-ai/birefnet/requests/0b3a4c2e-0000-4000-8000-000000000001/status",
                    "/queue/fal-ai/birefnet/requests/0b3a4c2e-0000-4000-8000-000000000002/status/",
                )
            }
            assert client.get("/livez").status_code == 200
            assert client.get("/no/such/route/at/all/x").status_code == 404
        assert len(codes) == 1
        code = str(codes.pop())
        # A request is counted just after its response went out: wait for the last one to land.
        wait_for(
            lambda: count(route="unmatched", method="GET", status="404") >= 1, 5, "the 404 to be counted"
        )
        assert count(route=route, method="GET", status=code) - before.get(code, 0.0) == 2
        text = generate_latest(REGISTRY).decode()
        assert "0b3a4c2e-0000" not in text, "raw paths never become label values"
        assert sample(text, "birefnet_http_requests_total", route="/livez", method="GET", status="200")
        assert sample(text, "birefnet_http_request_duration_seconds_count", route="/livez", method="GET")
    finally:
        gateway.stop()
