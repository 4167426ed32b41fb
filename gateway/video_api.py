"""`fal-ai/birefnet/v2/video` on the queue and sync-run APIs. Status, stream, result and cancel are the
shared request routes (`/fal-ai/birefnet/requests/{id}`, the subpath dropped as for the image endpoints)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError
from starlette.responses import Response

from common.domain.auth import Principal
from common.domain.errors import InputErrors
from common.domain.schemas import JobParams, JobSpec
from common.domain.variants import DEFAULT_MODEL_NAME
from common.domain.video import BiRefNetVideoInput, BiRefNetVideoOutput, VideoOptions
from gateway.context import Gateway, gateway
from gateway.inputs import InputWrites, resolve_image_url
from gateway.models import ERRORS, ErrorBody, QueueSubmitted, ValidationErrorBody
from gateway.parsing import json_object_body
from gateway.queue_api import (
    BAD_REQUEST,
    LIMITED,
    LifecycleHeader,
    MaxQueueQuery,
    NoRetryHeader,
    PriorityHeader,
    TimeoutHeader,
    WebhookQuery,
    options,
    submitted_answer,
)
from gateway.run_api import run_answer
from gateway.security import Caller
from gateway.submit import SubmitOptions, enqueue, request_fields
from gateway.urls import APP_PATH
from producer.admission import Submitted, check_resolution_allowed, detail, validation_details

VIDEO_PATH = f"/{APP_PATH}/v2/video"
queue_router = APIRouter(prefix="/queue", tags=["queue"])
run_router = APIRouter(prefix="/run", tags=["run"])
BODY_DOC = {
    "requestBody": {
        "required": False,
        "content": {
            "application/json": {
                "schema": {"$ref": "#/components/schemas/BiRefNetVideoInput"},
                "examples": {
                    "fal": {
                        "summary": "fal's input",
                        "value": {"video_url": "https://example.com/clip.mp4", "output_mask": True},
                    },
                    "webm_alpha": {
                        "summary": "VP9 WebM with alpha",
                        "value": {
                            "video_url": "https://example.com/clip.mp4",
                            "video_output_type": "VP9 (.webm)",
                        },
                    },
                },
            }
        },
    }
}


def video_spec_fields(data: BiRefNetVideoInput) -> dict:
    """JobSpec fields of a video job: the image path's parameters, and the video options in `extra`."""
    params = JobParams(
        operating_resolution=data.operating_resolution.value,
        output_mask=data.output_mask,
        refine_foreground=data.refine_foreground,
        sync_mode=data.sync_mode,
    )
    return {"params": params, "video": VideoOptions.from_input(data).model_dump()}


def key_budgets(principal: Principal) -> dict:
    """The key's budgets, carried by the job. A video is admitted as one unit and charged the rest by the
    worker that opens it (common/state/limits.py): the gateway never parses a video, inline or not."""
    budgets: dict[str, int | None] = {
        "max_concurrent": principal.max_concurrent,
        "requests_per_minute": principal.requests_per_minute,
    }
    if not any(budgets.values()):
        return {}
    return {"limits": {**budgets, "units": 1}}


def validate_video(data: dict, gw: Gateway) -> tuple[BiRefNetVideoInput, str]:
    """The input and its variant id, or InputErrors (FastAPI's list)."""
    try:
        parsed = BiRefNetVideoInput.model_validate(data)
        variant = gw.settings.variants.by_model_name("v2", parsed.model.value)
    except ValidationError as exc:
        raise InputErrors(validation_details(exc)) from exc
    except KeyError as exc:
        raise InputErrors([detail(["body", "model"], str(exc.args[0]), "value_error")]) from None
    check_resolution_allowed(parsed.operating_resolution.value, variant, parsed.model.value)
    return parsed, variant.id


def submit_video_job(gw: Gateway, principal: Principal, body: bytes, opts: SubmitOptions) -> Submitted:
    data = json_object_body(body)
    default_variant = gw.settings.variants.by_model_name("v2", DEFAULT_MODEL_NAME).id
    request_id = gw.new_request_id(default_variant)
    writes = InputWrites(gw)  # a large inline video: stored only once the request is admitted
    try:
        parsed, variant = validate_video(data, gw)
        request_id = gw.new_request_id(variant)  # the id names the shard of its variant
        url = resolve_image_url(gw, principal, parsed.video_url, request_id, "video_url", writes)
    except InputErrors as exc:
        given = data.get("video_url")
        request_id = gw.new_request_id(default_variant)  # nothing was stored under the other one
        fields = request_fields(gw.settings, principal, opts, request_id, video=VideoOptions().model_dump())
        spec = JobSpec(
            **fields,
            variant=default_variant,
            image_url=given[:2048] if isinstance(given, str) else "",
            params=JobParams(),
        )
        return enqueue(gw, principal, opts, spec, rejection=exc)
    job = video_spec_fields(parsed)
    fields = request_fields(
        gw.settings, principal, opts, request_id, video=job["video"], **key_budgets(principal)
    )
    spec = JobSpec(**fields, variant=variant, image_url=url, params=job["params"])
    return enqueue(gw, principal, opts, spec, writes=writes)


@queue_router.post(
    VIDEO_PATH,
    response_model=QueueSubmitted,
    summary="Submit a fal-ai/birefnet/v2/video request",
    openapi_extra=BODY_DOC,
    responses={
        **ERRORS,
        **BAD_REQUEST,
        **LIMITED,
        422: {"model": ValidationErrorBody, "description": "Body is not a JSON object"},
    },
)
async def submit_video(
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
        submit_video_job,
        gw,
        caller,
        await request.body(),
        options("v2", timeout, queue_priority, lifecycle, no_retry, fal_webhook, max_queue_length),
    )
    return await submitted_answer(gw, request, submitted)


@run_router.post(
    VIDEO_PATH,
    summary="Run fal-ai/birefnet/v2/video and wait for the output",
    openapi_extra=BODY_DOC,
    responses={
        **ERRORS,
        **BAD_REQUEST,
        **LIMITED,
        200: {"model": BiRefNetVideoOutput, "description": "The model output"},
        422: {"model": ValidationErrorBody, "description": "The model rejected the input"},
        504: {"model": ErrorBody, "description": "X-Fal-Request-Timeout passed before it started"},
    },
)
async def run_video(
    request: Request,
    caller: Caller,
    timeout: TimeoutHeader = None,
    queue_priority: PriorityHeader = None,
    lifecycle: LifecycleHeader = None,
    no_retry: NoRetryHeader = None,
    max_queue_length: MaxQueueQuery = None,
) -> Response:
    gw = gateway(request)
    submitted = await run_in_threadpool(
        submit_video_job,
        gw,
        caller,
        await request.body(),
        options(
            "v2",
            timeout,
            queue_priority,
            lifecycle,
            no_retry,
            max_queue_length=max_queue_length,
            watched=True,
        ),
    )
    return await run_answer(gw, request, submitted.request_id)
