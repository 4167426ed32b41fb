"""Prometheus metrics scraped over HTTP from real processes after real jobs."""

from __future__ import annotations

import httpx
import pytest
from skimage import data as samples

from common.observability.metrics import STAGES
from common.state import ops_state
from common.state.jobs import JobStore
from devstack.receiver import WebhookReceiver
from devstack.services import free_port
from producer.http_receiver import create_app
from tests.helpers.images import array_png
from tests.helpers.metrics import sample
from tests.helpers.pipeline import minio_body, put
from tests.helpers.servers import serve
from tests.helpers.stack import Stack, wait_for


def scrape(url: str) -> str:
    return httpx.get(url, timeout=5).text


@pytest.mark.timeout(300)
def test_worker_producer_and_webhook_metrics_move_after_jobs(stack: Stack, webhook_receiver: WebhookReceiver):
    settings = stack.settings
    worker_port, hooks_port = free_port(), free_port()
    stack.start_worker("general-light", extra_env={"BIREFNET_WORKER_METRICS_PORT": str(worker_port)})
    stack.start(
        ["-m", "deliverer", "--concurrency", "2"],
        "webhooks",
        {
            "BIREFNET_WEBHOOKS_METRICS_PORT": str(hooks_port),
            # the receiver listens on loopback, which the SSRF guard refuses by default
            "BIREFNET_FETCH_ALLOW_NETWORKS": "127.0.0.1/32",
            "BIREFNET_FETCH_ALLOWED_PORTS": "*",
        },
    )
    worker_url, hooks_url = (
        f"http://127.0.0.1:{worker_port}/metrics",
        f"http://127.0.0.1:{hooks_port}/metrics",
    )
    before = scrape(worker_url)
    for probe in ("healthz", "readyz"):  # the probes share the port: 200 while the inference thread is fine
        answer = httpx.get(f"http://127.0.0.1:{worker_port}/{probe}", timeout=5)
        assert answer.status_code == 200 and answer.text.strip() == "ok", (probe, answer.text)
    assert sample(before, "birefnet_model_load_seconds", variant="general-light") > 0
    assert (
        sample(before, "birefnet_model_untrained", variant="general-light") == 1
    )  # tests run recipe weights
    assert sample(before, "birefnet_jobs_completed_total", variant="general-light", outcome="done") is None

    hook = {"webhook_url": webhook_receiver.url}
    put(stack, "m/astronaut.png", hook, body=array_png(samples.astronaut()))
    put(stack, "m/broken.png", hook, body=b"<html>not an image</html>")
    with serve(create_app(settings)) as producer_url:
        for key in ("m/astronaut.png", "m/broken.png"):
            response = httpx.post(f"{producer_url}/s3-events", content=minio_body(settings.input_bucket, key))
            assert response.status_code == 200, response.text
        producer = scrape(f"{producer_url}/metrics")
        webhook_receiver.wait(2, timeout=180)
        after_jobs = scrape(f"{producer_url}/metrics")

    assert sample(producer, "birefnet_producer_events_total", source="http", outcome="enqueued") >= 2
    assert sample(after_jobs, "birefnet_workers_online", variant="general-light") == 1
    assert sample(after_jobs, "birefnet_queue_waiting_jobs", variant="general-light") == 0

    worker = scrape(worker_url)
    for stage in STAGES:  # the good job went through every stage once; the broken one waited in the queue
        count = sample(worker, "birefnet_job_stage_seconds_count", variant="general-light", stage=stage)
        assert count == (2 if stage == "queue_wait" else 1), (stage, count)
    assert sample(worker, "birefnet_job_stage_seconds_sum", variant="general-light", stage="inference") > 0
    assert sample(worker, "birefnet_jobs_completed_total", variant="general-light", outcome="done") == 1
    assert sample(worker, "birefnet_jobs_completed_total", variant="general-light", outcome="failed") == 1
    assert (
        sample(worker, "birefnet_job_errors_total", variant="general-light", error_type="image_load_error")
        == 1
    )

    wait_for(
        lambda: sample(scrape(hooks_url), "birefnet_webhook_deliveries_total", outcome="delivered") == 2,
        10,
        "the deliverer to count both webhooks",
    )

    r = JobStore.from_url(settings.redis_url).redis
    completions = ops_state.read_completions(r, 0)
    assert sorted(c["outcome"] for c in completions) == ["done", "failed"]
    assert all(float(c["latency"]) > 0 for c in completions)


@pytest.mark.timeout(120)
def test_sqs_producer_serves_event_counts_and_queue_depth(stack: Stack):
    port = free_port()
    stack.start(["-m", "producer", "sqs"], "producer", {"BIREFNET_PRODUCER_METRICS_PORT": str(port)})
    put(stack, "s/one.png")
    url = f"http://127.0.0.1:{port}/metrics"

    def enqueued() -> float | None:
        try:
            return sample(scrape(url), "birefnet_producer_events_total", source="sqs", outcome="enqueued")
        except httpx.HTTPError:
            return None

    wait_for(lambda: enqueued() == 1, 60, "the SQS producer to count the upload")
    text = scrape(url)
    assert sample(text, "birefnet_queue_messages", variant="general-light") == 1
    assert sample(text, "birefnet_queue_waiting_jobs", variant="general-light") == 1
    assert sample(text, "birefnet_queue_oldest_job_age_seconds", variant="general-light") >= 0
    assert sample(text, "birefnet_workers_online", variant="general-light") == 0
