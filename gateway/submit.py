"""Turning an API call into a job (blocking; runs in the thread pool). As on fal, any JSON object is
queued, and invalid input becomes a request COMPLETED at once with the model's 422 body."""

from __future__ import annotations

import time
from dataclasses import dataclass

from common.adapters.storage import request_output_prefix
from common.domain.auth import Principal
from common.domain.errors import InputErrors, JobError, LimitRefused, QueueUnreachable
from common.domain.schemas import JobParams, JobSpec
from common.domain.variants import DEFAULT_MODEL_NAME, Endpoint
from common.settings import GatewaySettings
from common.state import keys
from gateway.context import Gateway
from gateway.inputs import InputWrites, resolve_image_url
from gateway.parsing import json_object_body
from gateway.responses import FalError
from producer.admission import Admission, Submitted, validate_input


@dataclass(frozen=True)
class SubmitOptions:
    endpoint: Endpoint
    webhook_url: str | None = None
    start_timeout: float | None = None
    priority: str = "normal"
    output_ttl: int | None = None
    no_retry: bool = False  # x-fal-no-retry: a job whose worker dies is not run again
    max_queue_length: int | None = None  # fal_max_queue_length: refuse when this many already wait
    watched: bool = False  # the caller waits for the result (a sync run): the record is created marked so


def mask_cache_scope(principal: Principal) -> str:
    """Content-cache scope of a key's jobs: its own unless its entry says `"mask_cache": "shared"`."""
    return "shared" if principal.mask_cache == "shared" else f"key:{principal.key_id}"


def resolve_background(
    gw: Gateway, principal: Principal, parsed, request_id: str, writes: InputWrites | None = None
):
    """`background_image_url` under the same policy as `image_url` (s3 permissions, SSRF check, large data
    URIs)."""
    if not parsed.background_image_url:
        return parsed
    url = resolve_image_url(
        gw, principal, parsed.background_image_url, request_id, "background_image_url", writes
    )
    return parsed.model_copy(update={"background_image_url": url})


def request_fields(
    settings: GatewaySettings, principal: Principal, options: SubmitOptions, request_id: str, **extra: object
) -> dict:
    """The JobSpec fields every API request's job has (`extra`: more of its `extra`)."""
    now = time.time()
    return dict(
        request_id=request_id,
        endpoint=options.endpoint,
        source="api",
        output_prefix=request_output_prefix(settings, request_id),
        webhook_url=options.webhook_url,
        owner=principal.key_id,
        priority=options.priority,
        created_at=now,
        start_deadline=now + options.start_timeout if options.start_timeout else None,
        max_attempts=1 if options.no_retry else None,
        extra={
            "user_id": principal.user_id,
            "output_ttl": options.output_ttl or settings.gateway_output_retention,
            **extra,
        },
    )


def submit_job(gw: Gateway, principal: Principal, body: bytes, options: SubmitOptions) -> Submitted:
    data = json_object_body(body)
    settings = gw.settings
    default_variant = settings.variants.by_model_name(options.endpoint, DEFAULT_MODEL_NAME).id
    writes = InputWrites(gw)  # large inline inputs: stored only once the request is admitted
    try:
        parsed, variant = validate_input(options.endpoint, data, settings)
    except InputErrors as exc:
        return reject(gw, principal, options, data, default_variant, exc)
    request_id = gw.new_request_id(variant.id)  # the id names the shard of its variant
    fields = request_fields(settings, principal, options, request_id)
    try:
        image_url = resolve_image_url(gw, principal, parsed.image_url, request_id, writes=writes)
        parsed = resolve_background(gw, principal, parsed, request_id, writes)
    except InputErrors as exc:
        return reject(
            gw, principal, options, data, default_variant, exc
        )  # nothing was stored under request_id
    spec = JobSpec(
        **fields,
        variant=variant.id,
        image_url=image_url,
        params=JobParams.from_input(parsed),
        mask_cache_scope=mask_cache_scope(principal),
    )
    return enqueue(gw, principal, options, spec, writes=writes)


def reject(
    gw: Gateway, principal: Principal, options: SubmitOptions, data: dict, variant: str, exc: InputErrors
) -> Submitted:
    """A request COMPLETED at once with the model's 422 body (invalid input), recorded under `variant`."""
    fields = request_fields(gw.settings, principal, options, gw.new_request_id(variant))
    given_url = data.get("image_url")
    spec = JobSpec(
        **fields,
        variant=variant,
        image_url=given_url[:2048] if isinstance(given_url, str) else "",
        params=JobParams(),
    )
    return enqueue(gw, principal, options, spec, rejection=exc)


def enqueue(
    gw: Gateway,
    principal: Principal,
    options: SubmitOptions,
    spec: JobSpec,
    rejection: JobError | None = None,
    writes: InputWrites | None = None,
) -> Submitted:
    """Every API job's way into the queue (producer/admission.py), under the key's limits and the queue caps;
    a refusal is fal's flat error (429 with Retry-After, or 503 when the queue cannot be reached)."""
    shard = gw.on_variant(spec.variant)  # the job's record and message; the key's limits on shard 0
    admission = Admission(gw.settings, shard.store, shard.celery, gw.limiter)
    # Outputs (and a large inline input) are deleted after their retention; a queued request expires.
    schedule = {keys.OUTPUTS: (f"req:{spec.request_id}", spec.created_at + spec.extra["output_ttl"])}
    if spec.start_deadline:
        schedule[keys.DEADLINES] = (spec.request_id, spec.start_deadline)
    try:
        return admission.enqueue(
            spec,
            rejection=rejection,
            principal=principal,
            max_queue_length=options.max_queue_length,
            schedule=schedule,
            prepare=writes.flush if writes is not None else None,
            watched=options.watched,
        )
    except LimitRefused as exc:
        raise FalError.flat(
            exc.status_code, exc.message, exc.error_type, headers={"Retry-After": str(exc.retry_after)}
        ) from None
    except QueueUnreachable as exc:
        raise FalError.flat(exc.status_code, exc.message, exc.error_type, request_id=spec.request_id) from exc
