"""The queue API (docs/api.md#queue): submit on the app id (`/fal-ai/birefnet[/v2]`), then status,
status stream, result and cancel on `/fal-ai/birefnet/requests/{id}` for both."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from starlette.responses import Response

from common.domain.schemas import BiRefNetOutput
from common.domain.status import Status
from common.domain.variants import Endpoint
from common.state import keys
from common.state.webhooks import first_attempt_due
from gateway import records
from gateway.context import Gateway, gateway
from gateway.inputs import priority
from gateway.models import (
    ERRORS,
    CancelStatus,
    ErrorBody,
    QueueStatus,
    QueueSubmitted,
    ValidationErrorBody,
)
from gateway.parsing import TIMEOUT_MAX_LENGTH, TIMEOUT_PATTERN, lifecycle_seconds, start_timeout
from gateway.responses import REQUEST_ID, FalError, fal_json, stored_result
from gateway.security import Caller
from gateway.submit import SubmitOptions, Submitted, submit_job
from gateway.urls import APP_PATH, public_base, request_urls
from producer.admission import flag

router = APIRouter(prefix="/queue", tags=["queue"])
ENDPOINTS: dict[Endpoint, str] = {"v1": "", "v2": "/v2"}  # endpoint -> path after fal-ai/birefnet
INPUT_SCHEMAS = {"v1": "BiRefNetInput", "v2": "BiRefNetV2Input"}
REQUEST = f"/{APP_PATH}/requests/{{request_id}}"

# Typed `str` with a None default (not `str | None`): optional without documenting a null value.
TimeoutHeader = Annotated[
    str,
    Header(
        alias="X-Fal-Request-Timeout",
        description="Seconds the request may wait before it starts; then it "
        "completes with a 504 request_timeout error. Not a number: 400.",
        json_schema_extra={"pattern": TIMEOUT_PATTERN, "maxLength": TIMEOUT_MAX_LENGTH},
    ),
]
# No whitespace or control characters, spelled out: `\s` differs between Python, Rust (pydantic) and
# ECMAScript (the OpenAPI document's regex dialect), e.g. on U+0085.
WEBHOOK_PATTERN = (
    r"^https?://[^\u0000-\u0020\u007f-\u009f\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f"
    r"\u205f\u3000\ufeff]+$"
)
WebhookQuery = Annotated[
    str,
    Query(
        description="URL to POST the result to when done (fal's webhook payload, signed).",
        pattern=WEBHOOK_PATTERN,
        max_length=4096,
    ),
]
MaxQueueQuery = Annotated[
    int,
    Query(
        alias="fal_max_queue_length",
        ge=0,
        description="Refuse (429 queue_full) instead of queueing when this many "
        "requests already wait for the model.",
    ),
]
LIMITED: dict[int | str, dict[str, Any]] = {
    429: {
        "model": ErrorBody,
        "description": "A limit of the API key (requests_per_minute: rate_limited; "
        "max_concurrent: concurrency_limit) or the queue cap (queue_full); see Retry-After",
    }
}
BAD_REQUEST: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "Malformed X-Fal-Request-Timeout or lifecycle header"}
}
PriorityHeader = Annotated[
    str,
    Header(
        alias="X-Fal-Queue-Priority",
        description="`normal` (default) or `low` (runs after every normal request).",
    ),
]
LifecycleHeader = Annotated[
    str,
    Header(
        alias="x-fal-object-lifecycle-preference",
        description='JSON {"expiration_duration_seconds": N}: retention of this request\'s output files.',
    ),
]
NoRetryHeader = Annotated[
    str,
    Header(
        alias="x-fal-no-retry",
        description="`1`, `true`, `yes` or `on`: if the worker running this request dies, the "
        "request fails (503 runner_disconnected) instead of running again.",
    ),
]


INPUT_EXAMPLES = {  # fal's input, then the extension fields (common.domain.extensions)
    "fal": {
        "summary": "fal's input",
        "value": {"image_url": "https://example.com/cat.jpg", "output_mask": True},
    },
    "background_jpeg": {
        "summary": "Extension: on white, as JPEG",
        "value": {
            "image_url": "https://example.com/shoe.jpg",
            "background_color": "#ffffff",
            "output_format": "jpeg",
        },
    },
    "product_shot": {
        "summary": "Extension: trimmed square on a backdrop",
        "value": {
            "image_url": "https://example.com/shoe.jpg",
            "crop_to_subject": True,
            "crop_margin": "10%",
            "crop_aspect_ratio": "1:1",
            "background_image_url": "https://example.com/backdrop.jpg",
            "background_fit": "cover",
        },
    },
    "avif": {
        "summary": "Extension: AVIF with alpha",
        "value": {"image_url": "https://example.com/cat.jpg", "output_format": "avif"},
    },
}


def body_doc(endpoint: str) -> dict:
    schema = {"$ref": f"#/components/schemas/{INPUT_SCHEMAS[endpoint]}"}
    return {
        "requestBody": {
            "required": False,
            "content": {"application/json": {"schema": schema, "examples": INPUT_EXAMPLES}},
        }
    }


def options(
    endpoint: Endpoint,
    timeout: str | None,
    queue_priority: str | None,
    lifecycle: str | None,
    no_retry: str | None,
    webhook_url: str | None = None,
    max_queue_length: int | None = None,
    watched: bool = False,
) -> SubmitOptions:
    return SubmitOptions(
        endpoint=endpoint,
        webhook_url=webhook_url,
        start_timeout=start_timeout(timeout),
        priority=priority(queue_priority),
        output_ttl=lifecycle_seconds(lifecycle),
        no_retry=flag(no_retry),
        max_queue_length=max_queue_length,
        watched=watched,
    )


def not_found(request_id: str) -> FalError:
    return FalError(404, {"detail": "Request not found"}, request_id=request_id)


def make_submit(endpoint: Endpoint):
    async def submit(
        request: Request,
        caller: Caller,
        timeout: TimeoutHeader = None,
        queue_priority: PriorityHeader = None,
        lifecycle: LifecycleHeader = None,
        no_retry: NoRetryHeader = None,
        fal_webhook: WebhookQuery = None,
        max_queue_length: MaxQueueQuery = None,
    ) -> Response:
        gw = gateway(request)
        submitted = await run_in_threadpool(
            submit_job,
            gw,
            caller,
            await request.body(),
            options(endpoint, timeout, queue_priority, lifecycle, no_retry, fal_webhook, max_queue_length),
        )
        return await submitted_answer(gw, request, submitted)

    submit.__name__ = f"submit_{endpoint}"
    return submit


async def submitted_answer(gw: Gateway, request: Request, submitted: Submitted) -> Response:
    """fal's submit answer: IN_QUEUE, the request's URLs and its queue position."""
    rid = submitted.request_id
    body = {
        "status": "IN_QUEUE",
        "request_id": rid,
        "gateway_request_id": rid,
        **request_urls(public_base(request, gw.settings), rid),
        "queue_position": submitted.queue_position or 0,  # read when it was queued
    }
    return fal_json(body, request_id=rid)


for _endpoint, _suffix in ENDPOINTS.items():
    router.add_api_route(
        f"/{APP_PATH}{_suffix}",
        make_submit(_endpoint),
        methods=["POST"],
        response_model=QueueSubmitted,
        summary=f"Submit a fal-ai/birefnet{_suffix} request",
        openapi_extra=body_doc(_endpoint),
        responses={
            **ERRORS,
            **BAD_REQUEST,
            **LIMITED,
            422: {"model": ValidationErrorBody, "description": "Body is not a JSON object"},
        },
    )


async def visible(gw: Gateway, request_id: str, caller, logs_from: int | None = None) -> records.StatusRead:
    read = await records.read_status(gw, request_id, caller, logs_from)
    if read is None:
        raise not_found(request_id)
    return read


@router.get(
    REQUEST + "/status",
    response_model=QueueStatus,
    responses={**ERRORS, 202: {"model": QueueStatus, "description": "IN_QUEUE or IN_PROGRESS"}},
)
async def status(
    request: Request,
    request_id: str,
    caller: Caller,
    logs: Annotated[str, Query(description="1/true: include all logs so far")] = None,
) -> Response:
    """202 while IN_QUEUE / IN_PROGRESS, 200 once COMPLETED (failed and cancelled requests too)."""
    gw = gateway(request)
    read = await visible(gw, request_id, caller, 0 if flag(logs) else None)
    urls = request_urls(public_base(request, gw.settings), request_id)
    body = records.status_body(read.snap, urls, read.logs, read.position)
    return fal_json(body, 200 if read.snap.completed else 202, request_id=request_id)


@router.get(
    REQUEST + "/status/stream",
    responses={
        **ERRORS,
        200: {
            "content": {"text/event-stream": {}},
            "description": "`data: <status JSON>` per change "
            "(logs: new entries only), `: ping` keep-alives; closes after COMPLETED.",
        },
    },
)
async def status_stream(
    request: Request,
    request_id: str,
    caller: Caller,
    logs: Annotated[str, Query(description="1/true: include new log entries")] = None,
) -> Response:
    gw = gateway(request)
    variant = (await visible(gw, request_id, caller)).snap.variant
    urls = request_urls(public_base(request, gw.settings), request_id)
    return StreamingResponse(
        status_events(gw, request_id, caller, urls, flag(logs), variant),
        media_type="text/event-stream",
        headers={REQUEST_ID: request_id, "cache-control": "no-cache", "x-accel-buffering": "no"},
    )


async def status_events(
    gw: Gateway, request_id: str, caller, urls: dict, with_logs: bool, variant: str = ""
) -> AsyncIterator[str]:
    """One `data:` event per change, read when the job's pub/sub event says something changed (its first
    read marks it watched, so its transitions publish) and, while it is queued, every
    `gateway_queue_position_poll` s for its position (other jobs' transitions publish only when watched);
    `: ping` keep-alives in between cost no Redis command."""
    sent_logs, last_state, last_sent = 0, None, 0.0
    marked = False
    async with gw.on_request(request_id).events.watch(request_id, variant) as watch:
        while True:
            read = await records.read_status(
                gw, request_id, caller, sent_logs if with_logs else None, watch=not marked
            )
            if read is None:
                return
            marked = True
            if (read.snap.status, read.position) != last_state or read.logs:
                body = records.status_body(read.snap, urls, read.logs, read.position)
                yield f"data: {json.dumps(body, separators=(',', ':'))}\n\n"
                sent_logs += len(read.logs or [])
                last_state, last_sent = (read.snap.status, read.position), time.monotonic()
                if read.snap.completed:
                    return
            # Sleep until an event, a ping is due, or the safety re-check; only events and re-checks read.
            idle = 0.0
            queued = read.snap.status == Status.IN_QUEUE
            recheck = min(watch.recheck_after, gw.settings.gateway_queue_position_poll) if queued else None
            while True:
                reread_after = recheck if recheck is not None else watch.recheck_after
                ping_in = gw.settings.gateway_sse_ping_interval - (time.monotonic() - last_sent)
                if ping_in <= 0:
                    yield ": ping\n\n"
                    last_sent = time.monotonic()
                    continue
                started = time.monotonic()
                if await watch.wait(min(ping_in, reread_after - idle)):
                    break
                idle += time.monotonic() - started
                if idle >= reread_after:
                    break


@router.get(
    REQUEST,
    responses={
        **ERRORS,
        200: {"model": BiRefNetOutput, "description": "The model output"},
        400: {"model": ErrorBody, "description": "Not completed yet"},
        422: {"model": ValidationErrorBody, "description": "The model rejected the input"},
        499: {"model": ErrorBody, "description": "Cancelled"},
        504: {"model": ErrorBody, "description": "X-Fal-Request-Timeout passed before it started"},
    },
)
async def result(request: Request, request_id: str, caller: Caller) -> Response:
    """The output (200), or the error with the code the model answered."""
    gw = gateway(request)
    if not (await visible(gw, request_id, caller)).snap.completed:
        raise FalError.flat(400, "Request is still in progress", "bad_request", request_id=request_id)
    return stored_result(*await records.result(gw, request_id), request_id)


def cancel_job(gw: Gateway, request_id: str) -> str:
    shard = gw.on_request(request_id)
    outcome = shard.store.cancel(request_id)
    if outcome == "cancelled":
        shard.redis.zrem(keys.DEADLINES, request_id)
        record = shard.store.get(request_id)
        if record is not None and record.spec.webhook_url:
            shard.store.send_webhook(request_id, first_attempt_due(gw.settings))
    return outcome


_CANCEL = {
    "cancelled": (202, "CANCELLATION_REQUESTED"),
    "requested": (202, "CANCELLATION_REQUESTED"),
    "already_completed": (400, "ALREADY_COMPLETED"),
    "not_found": (404, "NOT_FOUND"),
}


@router.put(
    REQUEST + "/cancel",
    responses={
        **ERRORS,
        202: {"model": CancelStatus},
        400: {"model": CancelStatus},
        404: {"model": CancelStatus},
    },
)
async def cancel(request: Request, request_id: str, caller: Caller) -> Response:
    """A queued request never runs; a running one stops at its next checkpoint if it can."""
    gw = gateway(request)
    read = await records.read_status(gw, request_id, caller)
    outcome = "not_found" if read is None else await run_in_threadpool(cancel_job, gw, request_id)
    code, state = _CANCEL[outcome]
    return fal_json({"status": state}, code, request_id=request_id)
