"""Mask reuse: `POST /queue|/run .../requests/{id}/compose` renders new outputs (output and extension
fields) from a request's kept mask, as a request of its own served by a worker of the source's variant
without a network run. The source must be the caller's, with its mask kept: not sync_mode, not failed
before its mask, and within its output retention."""

from __future__ import annotations

import uuid
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError
from starlette.responses import Response

from common.adapters.storage import KEPT_MANIFEST, parse_s3_url, request_output_prefix
from common.domain.auth import ANONYMOUS, Principal
from common.domain.errors import InputErrors
from common.domain.schemas import BiRefNetOutput, ComposeInput, JobParams, JobSpec
from gateway.context import Gateway, gateway
from gateway.inputs import InputWrites
from gateway.models import ERRORS, ErrorBody, QueueSubmitted, ValidationErrorBody
from gateway.parsing import json_object_body
from gateway.queue_api import (
    LifecycleHeader,
    NoRetryHeader,
    PriorityHeader,
    TimeoutHeader,
    WebhookQuery,
    not_found,
    options,
    submitted_answer,
)
from gateway.responses import FalError
from gateway.run_api import run_answer
from gateway.security import Caller
from gateway.submit import SubmitOptions, Submitted, enqueue, request_fields, resolve_background
from gateway.urls import APP_PATH
from producer.admission import validation_details

router = APIRouter(tags=["compose"])
PATH = f"/{APP_PATH}/requests/{{request_id}}/compose"

EXAMPLES = {
    "white_background_jpeg": {
        "summary": "Opaque white background, JPEG",
        "value": {"background_color": "#ffffff", "output_format": "jpeg"},
    },
    "product_shot": {
        "summary": "Square product shot: trimmed to the subject, 10 % margin, on a backdrop",
        "value": {
            "crop_to_subject": True,
            "crop_margin": "10%",
            "crop_aspect_ratio": "1:1",
            "background_image_url": "https://example.com/backdrop.jpg",
            "background_fit": "cover",
        },
    },
    "avif_cutout": {
        "summary": "Transparent AVIF cut-out and the mask",
        "value": {"output_format": "avif", "output_mask": True},
    },
}
BODY_DOC = {
    "requestBody": {
        "required": False,
        "content": {
            "application/json": {
                "schema": {"$ref": "#/components/schemas/ComposeInput"},
                "examples": EXAMPLES,
            }
        },
    }
}
NOT_READY: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "The source request is still running"},
    404: {
        "model": ErrorBody,
        "description": "Unknown source request, another key's, or no mask kept "
        "(sync_mode, failed before its mask, output retention ended)",
    },
}


def source_manifest(gw: Gateway, principal: Principal, source_id: str) -> dict:
    """The kept-mask manifest of the caller's request `source_id`; FalError 404/400 otherwise."""
    try:
        uuid.UUID(source_id)  # request ids are UUIDs; anything else names no request (and no S3 key)
    except ValueError:
        raise not_found(source_id) from None
    record = gw.on_request(source_id).store.get(source_id)
    if record is not None and principal.key_id != ANONYMOUS and record.spec.owner != principal.key_id:
        raise not_found(source_id)
    if record is not None and not record.status.is_terminal:
        raise FalError.flat(400, "Request is still in progress", "bad_request", request_id=source_id)
    manifest = gw.objects.read_json(
        gw.settings.output_bucket, request_output_prefix(gw.settings, source_id) + KEPT_MANIFEST
    )
    if manifest is None or (principal.key_id != ANONYMOUS and manifest.get("owner") != principal.key_id):
        if record is None:
            raise not_found(source_id)
        raise FalError(
            404,
            {
                "detail": f"Request {source_id} has no kept mask: it used sync_mode, failed before "
                "its mask was computed, or its output retention ended"
            },
            request_id=source_id,
        )
    bucket, key = parse_s3_url(manifest["mask"])
    try:
        stored = gw.objects.exists(bucket, key)
    except Exception:  # noqa: BLE001 - unreadable: as missing (retention ended), nothing to compose from
        stored = False
    if not stored:
        raise FalError(
            404,
            {
                "detail": f"The kept mask of request {source_id} is no longer stored (its output "
                "retention ended)"
            },
            request_id=source_id,
        )
    return manifest


def submit_compose(
    gw: Gateway, principal: Principal, source_id: str, body: bytes, opts: SubmitOptions
) -> Submitted:
    data = json_object_body(body)
    manifest = source_manifest(gw, principal, source_id)
    request_id = gw.new_request_id(manifest["variant"])
    writes = InputWrites(gw)  # a large inline background: stored only once the request is admitted
    fields = {
        **request_fields(
            gw.settings,
            principal,
            replace(opts, endpoint=manifest["endpoint"]),
            request_id,
            kept_mask=manifest["mask"],
        ),
        "variant": manifest["variant"],
        "image_url": manifest["input"],
        "reuse_from": source_id,
    }
    try:
        try:
            parsed = ComposeInput.model_validate(data)
        except ValidationError as exc:
            raise InputErrors(validation_details(exc)) from exc
        parsed = resolve_background(gw, principal, parsed, request_id, writes)
    except InputErrors as exc:  # invalid options: the request completes at once with the 422, as a submit's
        return enqueue(gw, principal, opts, JobSpec(**fields, params=JobParams()), rejection=exc)
    spec = JobSpec(**fields, params=JobParams.from_input(parsed, manifest["operating_resolution"]))
    return enqueue(gw, principal, opts, spec, writes=writes)


@router.post(
    "/queue" + PATH,
    response_model=QueueSubmitted,
    openapi_extra=BODY_DOC,
    summary="Compose new outputs from a request's kept mask (queued; no network run)",
    responses={
        **ERRORS,
        **NOT_READY,
        422: {"model": ValidationErrorBody, "description": "Body is not a JSON object"},
    },
)
async def compose_queued(
    request: Request,
    request_id: str,
    caller: Caller,
    timeout: TimeoutHeader = None,
    queue_priority: PriorityHeader = None,
    lifecycle: LifecycleHeader = None,
    no_retry: NoRetryHeader = None,
    fal_webhook: WebhookQuery = None,
) -> Response:
    """Answers like a submit: a new request id with its status/response/cancel URLs. Invalid options
    complete that request with a 422 result, as on submit."""
    gw = gateway(request)
    submitted = await run_in_threadpool(
        submit_compose,
        gw,
        caller,
        request_id,
        await request.body(),
        options("v2", timeout, queue_priority, lifecycle, no_retry, fal_webhook),
    )
    return await submitted_answer(gw, request, submitted)


@router.post(
    "/run" + PATH,
    openapi_extra=BODY_DOC,
    summary="Compose new outputs from a request's kept mask and wait for them (no network run)",
    responses={
        **ERRORS,
        **NOT_READY,
        200: {"model": BiRefNetOutput, "description": "The output"},
        422: {"model": ValidationErrorBody, "description": "Invalid options"},
    },
)
async def compose_run(
    request: Request,
    request_id: str,
    caller: Caller,
    timeout: TimeoutHeader = None,
    queue_priority: PriorityHeader = None,
    lifecycle: LifecycleHeader = None,
    no_retry: NoRetryHeader = None,
) -> Response:
    gw = gateway(request)
    submitted = await run_in_threadpool(
        submit_compose,
        gw,
        caller,
        request_id,
        await request.body(),
        options("v2", timeout, queue_priority, lifecycle, no_retry, watched=True),
    )
    return await run_answer(gw, request, submitted.request_id)
