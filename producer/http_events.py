"""`python -m producer http`: S3-style event notifications over HTTP (MinIO's webhook target).

POST /s3-events takes the same bodies as the SQS consumer (AWS records, SNS envelopes, MinIO's
`{"EventName", "Key", "Records"}`) and answers 2xx only once every job it names is enqueued; on
transient trouble (Redis or S3 unreachable) it answers 503, so MinIO keeps the event in its queue dir
and sends it again. Redelivered events map to the same job, so retries are safe.
"""

from __future__ import annotations

import hmac
import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from common.limits import QueueFull
from common.metrics import PRODUCER_EVENTS, add_metrics_route
from common.settings import Settings
from producer.events import MalformedEvent, ObjectCreated, parse_notification
from producer.intake import Intake

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1024 * 1024  # a notification is a few KB; MinIO sends one record per request


class CountingIntake:
    """Wraps an Intake to count events by outcome (`producer_events_total{source=...}`)."""

    def __init__(self, intake: Intake, source: str):
        self.intake, self.source = intake, source

    def handle(self, event: ObjectCreated) -> str | None:
        try:
            request_id = self.intake.handle(event)
        except QueueFull:
            PRODUCER_EVENTS.labels(self.source, "deferred").inc()
            raise
        except Exception:
            PRODUCER_EVENTS.labels(self.source, "error").inc()
            raise
        PRODUCER_EVENTS.labels(self.source, "enqueued" if request_id else "ignored").inc()
        return request_id


def _authorized(header: str | None, token: str) -> bool:
    if not token:
        return True
    # MinIO sends `Bearer <auth_token>`, or the auth_token as is when it already has a scheme.
    expected = token if len(token.split()) == 2 else f"Bearer {token}"
    return header is not None and hmac.compare_digest(header.strip().encode(), expected.encode())


def create_app(settings: Settings, intake: Intake | None = None) -> FastAPI:
    if intake is None:
        from producer.app import build_intake

        intake = build_intake(settings)
    counted = CountingIntake(intake, "http")
    app = FastAPI(title="birefnet producer (S3 event notifications)", docs_url=None, redoc_url=None,
                  openapi_url=None)
    add_metrics_route(app, settings)

    def handle(events: list[ObjectCreated]) -> list[str]:
        return [rid for rid in (counted.handle(e) for e in events) if rid]

    @app.post("/s3-events")
    async def s3_events(request: Request) -> Response:
        if not _authorized(request.headers.get("authorization"), settings.producer_http_token):
            return JSONResponse({"detail": "missing or wrong bearer token"}, status_code=401)
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            return JSONResponse({"detail": "notification too large"}, status_code=413)
        try:
            events = parse_notification(body)
        except MalformedEvent as exc:
            PRODUCER_EVENTS.labels("http", "malformed").inc()
            log.error("refusing a body that is not an S3 event notification (%s): %.200r", exc, body)
            return JSONResponse({"detail": f"not an S3 event notification: {exc}"}, status_code=400)
        try:
            # Intake talks to S3 and Redis synchronously: keep it off the event loop.
            request_ids = await run_in_threadpool(handle, events)
        except QueueFull as full:
            # Backpressure: MinIO keeps the event in its queue dir and sends it again.
            return JSONResponse({"detail": str(full), "error_type": "queue_full"}, status_code=503,
                                headers={"Retry-After": str(full.retry_after)})
        except Exception as exc:
            log.exception("could not enqueue jobs for a notification; asking the sender to retry")
            return JSONResponse({"detail": f"temporarily unable to enqueue: {type(exc).__name__}"},
                                status_code=503, headers={"Retry-After": "5"})
        return JSONResponse({"request_ids": request_ids, "records": len(events)})

    @app.head("/s3-events")
    async def s3_events_probe() -> Response:
        return Response(status_code=200)  # MinIO's liveness check of a webhook target is a HEAD

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> Response:
        try:
            intake.store.redis.ping()
        except Exception as exc:
            return JSONResponse({"status": "unavailable", "redis": str(exc)}, status_code=503)
        return JSONResponse({"status": "ok"})

    return app


def serve(settings: Settings, host: str | None = None, port: int | None = None) -> None:
    import uvicorn

    uvicorn.run(create_app(settings), host=host or settings.producer_http_host,
                port=port or settings.producer_http_port, log_level="info", access_log=False)
