"""`python -m producer http`: event notifications over HTTP (MinIO webhooks, Ceph RGW HTTP push, SNS).

POST /s3-events takes what the SQS consumer takes and answers 2xx only once every good record is enqueued
(refused records listed in `rejected`), 503 on transient trouble (MinIO keeps the event and sends it again;
redelivery maps to the same job), 400 with the reasons when no record is readable. SNS deliveries
(`x-amz-sns-message-type`) are authenticated by SNS's signature instead of the bearer token (producer.sns)."""

from __future__ import annotations

import hmac
import json
import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from common.adapters.netguard import NetPolicy
from common.observability.metrics import PRODUCER_EVENTS, add_metrics_route
from common.settings import ProducerSettings
from common.state.limits import QueueFull
from producer.intake import CountingIntake, Intake, build_intake
from producer.notifications import SNS_TYPES, MalformedEvent, Notification, ObjectCreated, parse_notification
from producer.sns import SnsRefused, SnsUnavailable, SnsVerifier

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1024 * 1024  # a notification is a few KB; MinIO sends one record per request


def _authorized(header: str | None, token: str) -> bool:
    if not token:
        return True
    # MinIO sends `Bearer <auth_token>`, or the auth_token as is when it already has a scheme.
    expected = token if len(token.split()) == 2 else f"Bearer {token}"
    return header is not None and hmac.compare_digest(header.strip().encode(), expected.encode())


def default_sns_verifier(settings: ProducerSettings) -> SnsVerifier:
    """Production SNS checks: SNS hosts only, fetched under the settings' network rules."""
    return SnsVerifier(
        settings.sns_topic_arns, NetPolicy.from_settings(settings), timeout=settings.http_timeout
    )


def _sns_message(headers, body: bytes) -> dict | None:
    """The SNS message of an SNS HTTP delivery ({} when unreadable), else None."""
    if headers.get("x-amz-sns-message-type") is None:
        return None
    try:
        message = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return message if isinstance(message, dict) else {}


def _rejections(note: Notification) -> list[dict]:
    return [{"record": r.index, "reason": r.reason} for r in note.rejected]


def create_app(
    settings: ProducerSettings, intake: Intake | None = None, sns: SnsVerifier | None = None
) -> FastAPI:
    intake = intake or build_intake(settings)
    sns = sns or default_sns_verifier(settings)
    counted = CountingIntake(intake, "http")
    app = FastAPI(
        title="birefnet producer (S3 event notifications)", docs_url=None, redoc_url=None, openapi_url=None
    )
    add_metrics_route(app, settings)

    def handle(events: list[ObjectCreated]) -> list[str]:
        return [rid for rid in (counted.handle(e) for e in events) if rid]

    def malformed(reason: str, body: bytes, **extra) -> JSONResponse:
        PRODUCER_EVENTS.labels("http", "malformed").inc()
        log.error("refusing a body that is not an event notification (%s): %.200r", reason, body)
        return JSONResponse({"detail": f"not an S3 event notification: {reason}", **extra}, status_code=400)

    async def handle_sns(message: dict, body: bytes) -> Response:
        if message.get("Type") not in SNS_TYPES:
            return malformed("an SNS delivery whose body is not an SNS message", body)
        try:
            await run_in_threadpool(sns.verify, message)
            if message["Type"] == "SubscriptionConfirmation":
                await run_in_threadpool(sns.confirm, message)
                return JSONResponse({"confirmed": message.get("TopicArn")})
        except SnsRefused as exc:
            PRODUCER_EVENTS.labels("http", "refused").inc()
            log.warning("refusing an SNS message: %s", exc)
            return JSONResponse({"detail": f"not accepted as an SNS message: {exc}"}, status_code=403)
        except SnsUnavailable as exc:
            log.warning("SNS message not checked now: %s", exc)
            return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "5"})
        if message["Type"] == "UnsubscribeConfirmation":
            log.warning("SNS unsubscribed this endpoint from %s", message.get("TopicArn"))
            return JSONResponse({"unsubscribed": message.get("TopicArn")})
        return await handle_events(message, body)

    async def handle_events(payload: bytes | dict, body: bytes) -> Response:
        try:
            note = parse_notification(payload)
        except MalformedEvent as exc:
            return malformed(str(exc), body)
        for rejected in note.rejected:
            log.error("HTTP notification: record %d skipped: %s", rejected.index, rejected.reason)
        if note.rejected and not note.events:
            return malformed("no readable record", body, rejected=_rejections(note))
        try:
            # Intake talks to S3 and Redis synchronously: keep it off the event loop.
            request_ids = await run_in_threadpool(handle, note.events)
        except QueueFull as full:
            # Backpressure: MinIO keeps the event in its queue dir and sends it again.
            return JSONResponse(
                {"detail": str(full), "error_type": "queue_full"},
                status_code=503,
                headers={"Retry-After": str(full.retry_after)},
            )
        except Exception as exc:
            log.exception("could not enqueue jobs for a notification; asking the sender to retry")
            return JSONResponse(
                {"detail": f"temporarily unable to enqueue: {type(exc).__name__}"},
                status_code=503,
                headers={"Retry-After": "5"},
            )
        return JSONResponse(
            {"request_ids": request_ids, "records": len(note.events), "rejected": _rejections(note)}
        )

    @app.post("/s3-events")
    async def s3_events(request: Request) -> Response:
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            return JSONResponse({"detail": "notification too large"}, status_code=413)
        message = _sns_message(request.headers, body)
        if message is not None:  # SNS authenticates by signature (it cannot send our bearer token)
            return await handle_sns(message, body)
        if not _authorized(request.headers.get("authorization"), settings.producer_http_token):
            return JSONResponse({"detail": "missing or wrong bearer token"}, status_code=401)
        return await handle_events(body, body)

    @app.head("/s3-events")
    async def s3_events_probe() -> Response:
        return Response(status_code=200)  # MinIO's liveness check of a webhook target is a HEAD

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> Response:
        try:
            # shard 0; another shard down fails (and keeps) only its variants' events
            intake.store.redis.ping()
        except Exception as exc:
            return JSONResponse({"status": "unavailable", "redis": str(exc)}, status_code=503)
        return JSONResponse({"status": "ok"})

    return app


def serve(settings: ProducerSettings, host: str | None = None, port: int | None = None) -> None:
    import uvicorn

    uvicorn.run(
        create_app(settings),
        host=host or settings.producer_http_host,
        port=port or settings.producer_http_port,
        log_level="info",
        access_log=False,
    )
