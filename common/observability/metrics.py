"""Prometheus metrics of every process (no torch here): worker job stages and models, producer events,
webhook deliveries, and queue gauges. The queue gauges are read from Redis, so every process exporting
them reports the same values: aggregate them with max(), not sum().
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Mapping

import redis
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from common.adapters.redis_conn import redis_client
from common.settings import GatewaySettings, ProducerSettings, RedisSettings
from common.state import keys, ops_state
from common.state.job_progress import Completion

log = logging.getLogger(__name__)

STAGES = ("queue_wait", "fetch", "decode", "inference", "render", "upload", "total")
# From a small image on a warm GPU (tens of ms) to a large one on CPU or a long queue (minutes).
_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

JOB_STAGE_SECONDS = Histogram(
    "birefnet_job_stage_seconds",
    "Seconds a job spent in each stage (queue_wait: created -> started; total: fetch through upload).",
    ["variant", "stage"],
    buckets=_BUCKETS,
)
JOBS_COMPLETED = Counter(
    "birefnet_jobs_completed_total",
    "Jobs a worker completed, by outcome (done, failed, cancelled).",
    ["variant", "outcome"],
)
JOB_ERRORS = Counter(
    "birefnet_job_errors_total",
    "Jobs that ended with an error, by fal error_type.",
    ["variant", "error_type"],
)
JOB_RETRIES = Counter(
    "birefnet_job_retries_total",
    "Job runs given back to the queue (transient trouble or an unexpected exception).",
    ["variant"],
)
MODEL_LOAD_SECONDS = Gauge(
    "birefnet_model_load_seconds",
    "Seconds this worker took to load (and warm) the variant's model.",
    ["variant"],
)
MODEL_UNTRAINED = Gauge(
    "birefnet_model_untrained",
    "1 when the variant runs on untrained recipe weights (results are meaningless).",
    ["variant"],
)
PATCH_ORDER_CONFIDENCE = Gauge(
    "birefnet_patch_order_confidence",
    "Mean mask confidence (|mask - 0.5|, 0..0.5) "
    "on the sample photos under each decoder patch order, from the worker's check at "
    "load (absent when the check did not run).",
    ["variant", "order"],
)
PATCH_ORDER_IN_USE = Gauge(
    "birefnet_patch_order_in_use",
    "1 for the decoder patch order the variant runs with, "
    "0 for the other; verdict: confirmed, adopted, pinned, inconclusive or skipped.",
    ["variant", "order", "configured", "verdict"],
)
MASKS = Counter(
    "birefnet_masks_total",
    "Masks a worker used for a job, by where they came from: network (a "
    "forward pass ran), cache (content cache: same image bytes, variant, weights, resolution) or "
    "compose (the kept mask of an earlier request).",
    ["variant", "source"],
)
WEBHOOK_DELIVERIES = Counter(
    "birefnet_webhook_deliveries_total",
    "Webhook delivery attempts by outcome (delivered, failed: will retry, gave_up: last retry failed).",
    ["outcome"],
)
PRODUCER_EVENTS = Counter(
    "birefnet_producer_events_total",
    "S3 object-created events handled by the "
    "producer, by source (sqs, http) and outcome (enqueued, ignored, error, malformed).",
    ["source", "outcome"],
)

# Gateway RED metrics: labelled by route template (never the raw path: request ids would make a series each).
HTTP_REQUESTS = Counter(
    "birefnet_http_requests_total",
    "HTTP requests the gateway answered, by route template, method and status code.",
    ["route", "method", "status"],
)
HTTP_REQUEST_SECONDS = Histogram(
    "birefnet_http_request_duration_seconds",
    "Seconds from a request's arrival at "
    "the gateway's router to the end of its response (streams: until they close), by "
    "route template and method.",
    ["route", "method"],
    buckets=_BUCKETS,
)


# --- worker side ---
def count_job_run(
    variant: str, outcome: str, completion: Completion | None, timings: dict[str, float] | None = None
) -> None:
    """Count a run the worker is done with: a retry, or (with its Completion) the job's end and its
    stage times. Never raises: metrics must not fail jobs."""
    try:
        if outcome == "retry":
            JOB_RETRIES.labels(variant).inc()
            return
        if completion is None:
            return
        JOBS_COMPLETED.labels(variant, completion.outcome).inc()
        if completion.error_type:
            JOB_ERRORS.labels(variant, completion.error_type).inc()
        if completion.queue_wait is not None:
            JOB_STAGE_SECONDS.labels(variant, "queue_wait").observe(max(completion.queue_wait, 0.0))
        for stage, seconds in (timings or {}).items():
            if stage in STAGES:
                JOB_STAGE_SECONDS.labels(variant, stage).observe(seconds)
    except Exception:
        log.warning("could not count metrics for a %s job", variant, exc_info=True)


def model_loaded(variant: str, seconds: float, untrained: bool) -> None:
    MODEL_LOAD_SECONDS.labels(variant).set(seconds)
    MODEL_UNTRAINED.labels(variant).set(1 if untrained else 0)


def patch_order_checked(variant: str, report: dict) -> None:
    """Export a worker.patch_order_check.PatchOrderReport (as a dict)."""
    for order, value in report.get("confidence", {}).items():
        PATCH_ORDER_CONFIDENCE.labels(variant, order).set(value)
    for order in ("einops", "legacy"):
        PATCH_ORDER_IN_USE.labels(variant, order, report["configured"], report["verdict"]).set(
            1 if order == report["in_use"] else 0
        )


class GpuMemoryCollector(Collector):
    """CUDA memory per device, read at scrape time from a torch the process has already imported."""

    def collect(self):
        torch = sys.modules.get("torch")  # never import it here: slim processes must stay slim
        if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return
        family = GaugeMetricFamily(
            "birefnet_gpu_memory_bytes",
            "CUDA memory by device and kind (allocated, reserved, max_allocated, free, total).",
            labels=["device", "kind"],
        )
        for index in range(torch.cuda.device_count()):
            device = f"cuda:{index}"
            family.add_metric([device, "allocated"], torch.cuda.memory_allocated(index))
            family.add_metric([device, "reserved"], torch.cuda.memory_reserved(index))
            family.add_metric([device, "max_allocated"], torch.cuda.max_memory_allocated(index))
            free, total = torch.cuda.mem_get_info(index)
            family.add_metric([device, "free"], free)
            family.add_metric([device, "total"], total)
        yield family


class RequestMetrics:
    """ASGI middleware counting requests and timing them per route template (RED: rate, errors, duration).
    Install it innermost, right around the router, so it sees the route the router matched."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        import time

        start = time.perf_counter()
        status = 500  # an exception before the response started is a server error

        async def send_and_record(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope.get("method", "GET")
            try:
                HTTP_REQUESTS.labels(route, method, str(status)).inc()
                HTTP_REQUEST_SECONDS.labels(route, method).observe(time.perf_counter() - start)
            except Exception:  # metrics must never fail a request
                log.warning("could not count a request to %s", route, exc_info=True)


# --- queue gauges (any process with Redis access) ---
class QueueCollector(Collector):
    """Queue depth, oldest waiting job, in progress, workers, pause flags, dead letters; read per scrape."""

    def __init__(self, settings: GatewaySettings | ProducerSettings):
        self.configure(settings)

    def configure(self, settings: GatewaySettings | ProducerSettings) -> None:
        self.queues = {v.id: v.queue for v in settings.variants}
        self.redis = redis_client(settings, socket_timeout=5, socket_connect_timeout=2)

    def collect(self):
        up = GaugeMetricFamily("birefnet_redis_up", "1 when the queue gauges could be read from Redis.")
        try:
            snapshot = ops_state.variant_snapshot(self.redis, self.queues)
            deadletters = self.redis.zcard(keys.DEADLETTER)
            webhooks_failed = self.redis.zcard(keys.WEBHOOK_FAILED)
        except redis.RedisError as exc:
            log.warning("queue metrics unavailable: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        gauges = {
            "queued_messages": ("birefnet_queue_messages", "Messages waiting in the variant's Celery queue."),
            "waiting_jobs": ("birefnet_queue_waiting_jobs", "Jobs IN_QUEUE for the variant."),
            "in_progress": ("birefnet_jobs_in_progress", "Jobs of the variant a worker is running."),
        }
        for field, (name, doc) in gauges.items():
            family = GaugeMetricFamily(name, doc, labels=["variant"])
            for variant, figures in snapshot.items():
                family.add_metric([variant], figures[field])
            yield family
        oldest = GaugeMetricFamily(
            "birefnet_queue_oldest_job_age_seconds",
            "Age of the oldest waiting job (0 when none).",
            labels=["variant"],
        )
        workers = GaugeMetricFamily(
            "birefnet_workers_online",
            "Workers with a fresh heartbeat serving the variant.",
            labels=["variant"],
        )
        paused = GaugeMetricFamily(
            "birefnet_variant_paused", "1 while `ops pause` holds the variant.", labels=["variant"]
        )
        for variant, figures in snapshot.items():
            oldest.add_metric([variant], figures["oldest_waiting_seconds"] or 0)
            workers.add_metric([variant], len(figures["workers"]))
            paused.add_metric([variant], 1 if figures["paused"] else 0)
        yield from (oldest, workers, paused)
        yield GaugeMetricFamily("birefnet_deadletters", "Jobs in the dead-letter list.", value=deadletters)
        yield GaugeMetricFamily(
            "birefnet_webhooks_failed", "Requests whose webhook failed every retry.", value=webhooks_failed
        )


_queue_collector: QueueCollector | None = None
_gpu_collector: GpuMemoryCollector | None = None


def register_queue_collector(settings: GatewaySettings | ProducerSettings) -> QueueCollector:
    """Export the queue gauges from this process (idempotent; the latest settings win)."""
    global _queue_collector
    if _queue_collector is None:
        _queue_collector = QueueCollector(settings)
        REGISTRY.register(_queue_collector)
    else:
        _queue_collector.configure(settings)
    return _queue_collector


def register_gpu_collector() -> None:
    global _gpu_collector
    if _gpu_collector is None:
        _gpu_collector = GpuMemoryCollector()
        REGISTRY.register(_gpu_collector)


# --- exposition ---
HealthCheck = Callable[[], tuple[bool, str]]  # (healthy, why) for one probe path


def start_metrics_server(
    port: int, what: str, probes: Mapping[str, HealthCheck] | None = None, host: str = "127.0.0.1"
) -> bool:
    """Serve /metrics on `host`:`port` in a daemon thread; a busy port is logged, not fatal (0: off). `probes`
    adds paths (e.g. /healthz) answering 200 or 503 with the check's text. Loopback unless told otherwise
    (`metrics_host`): the page has no authentication."""
    if not port:
        return False
    try:
        if probes:
            _serve_with_probes(port, probes, host)
        else:
            from prometheus_client import start_http_server

            start_http_server(port, addr=host)
    except OSError as exc:
        log.warning("%s metrics not served: %s port %d: %s", what, host, port, exc)
        return False
    log.info("%s metrics on %s:%d/metrics%s", what, host, port, "".join(f", {path}" for path in probes or {}))
    return True


def process_probes(settings: RedisSettings) -> dict[str, HealthCheck]:
    """/healthz and /readyz for a process whose work loop runs in its main thread (SQS producer, webhook
    deliverer). Liveness never touches Redis (a Redis restart must not restart every pod); readiness is a
    Redis PING."""
    import threading

    client = redis_client(settings, socket_timeout=2, socket_connect_timeout=2)

    def live() -> tuple[bool, str]:
        alive = threading.main_thread().is_alive()
        return alive, "ok" if alive else "main thread ended"

    def ready() -> tuple[bool, str]:
        try:
            client.ping()
        except redis.RedisError as exc:
            return False, f"Redis unreachable: {exc}"
        return True, "ok"

    return {"/healthz": live, "/readyz": ready}


def _serve_with_probes(port: int, probes: Mapping[str, HealthCheck], host: str) -> None:
    import threading
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    from prometheus_client import make_wsgi_app

    metrics_app = make_wsgi_app()

    def app(environ, start_response):
        check = probes.get(environ.get("PATH_INFO", ""))
        if check is None:
            return metrics_app(environ, start_response)
        try:
            ok, text = check()
        except Exception as exc:  # a failing check is an unhealthy answer, not a crashed server
            ok, text = False, f"check failed: {exc}"
        start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
        return [text.encode() + b"\n"]

    class Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, *args) -> None:  # probes every few seconds would flood the log
            pass

    server = make_server(host, port, app, server_class=Server, handler_class=QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()


def metrics_response():
    """The current metrics as a Starlette response (for a `GET /metrics` route)."""
    from starlette.responses import Response

    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


def add_metrics_route(
    app, settings: GatewaySettings | ProducerSettings | None = None, path: str = "/metrics"
) -> None:
    """Add `GET /metrics` to a FastAPI/Starlette app; with settings, the queue gauges are included."""
    if settings is not None:
        register_queue_collector(settings)
    app.add_route(path, lambda _request: metrics_response(), methods=["GET"], include_in_schema=False)


# --- webhook deliverer ---
def count_webhook_delivery(ok: bool, attempt: int, max_retries: int) -> None:
    """Count one delivery attempt by outcome (the deliverer calls it with each attempt it made)."""
    outcome = "delivered" if ok else ("gave_up" if attempt >= max_retries else "failed")
    WEBHOOK_DELIVERIES.labels(outcome).inc()
