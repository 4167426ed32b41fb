"""Turning an API call into a job: record, schedules, Celery message (blocking; runs in the thread pool).

As on fal, the queue accepts any JSON object and the model validates it: invalid input becomes a request
that is COMPLETED at once with the model's 422 body (and an ERROR webhook). Only bodies that are not a
JSON object at all are refused at submit.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from common.adapters.queue import send_job
from common.adapters.redis_conn import wait_for_replicas
from common.adapters.storage import request_output_prefix
from common.domain.auth import Principal
from common.domain.schemas import JobParams, JobSpec
from common.domain.variants import DEFAULT_MODEL_NAME
from common.state import keys
from common.state.results import finish_job
from producer.gateway.inputs import (
    InputErrors,
    parse_body,
    resolve_image_url,
    validate_input,
)
from producer.gateway.responses import FalError
from producer.gateway.state import Gateway


@dataclass(frozen=True)
class SubmitOptions:
    endpoint: str  # "v1" | "v2"
    webhook_url: str | None = None
    start_timeout: float | None = None
    priority: str = "normal"
    output_ttl: int | None = None
    no_retry: bool = False  # x-fal-no-retry: a job whose worker dies is not run again
    max_queue_length: int | None = None  # fal_max_queue_length: refuse when this many already wait


@dataclass(frozen=True)
class Submitted:
    request_id: str
    variant: str
    rejected: bool  # invalid input: already COMPLETED with a 422 result


def mask_cache_scope(principal: Principal) -> str:
    """Content-cache scope of a key's jobs: its own unless its entry says `"mask_cache": "shared"`."""
    return "shared" if principal.mask_cache == "shared" else f"key:{principal.key_id}"


def resolve_background(gw: Gateway, principal: Principal, parsed, request_id: str):
    """`background_image_url` under the same policy as `image_url` (s3 permissions, SSRF check, large data URIs)."""
    if not parsed.background_image_url:
        return parsed
    url = resolve_image_url(parsed.background_image_url, principal=principal, settings=gw.settings,
                            objects=gw.objects, secret=gw.secret, policy=gw.fetch_policy, request_id=request_id,
                            field="background_image_url")
    return parsed.model_copy(update={"background_image_url": url})


def submit_job(gw: Gateway, principal: Principal, body: bytes, options: SubmitOptions) -> Submitted:
    data = parse_body(body)
    settings = gw.settings
    request_id = str(uuid.uuid4())
    now = time.time()
    output_ttl = options.output_ttl or settings.gateway_output_retention
    common = dict(
        request_id=request_id, endpoint=options.endpoint, source="api",
        output_prefix=request_output_prefix(settings, request_id), webhook_url=options.webhook_url,
        owner=principal.key_id, priority=options.priority, created_at=now,
        start_deadline=now + options.start_timeout if options.start_timeout else None,
        max_attempts=1 if options.no_retry else None,
        extra={"user_id": principal.user_id, "output_ttl": output_ttl},
    )
    try:
        parsed, variant = validate_input(options.endpoint, data, settings)
        image_url = resolve_image_url(parsed.image_url, principal=principal, settings=settings, objects=gw.objects,
                                      secret=gw.secret, policy=gw.fetch_policy, request_id=request_id)
        parsed = resolve_background(gw, principal, parsed, request_id)
    except InputErrors as exc:
        image_url = data.get("image_url")
        spec = JobSpec(**common, variant=settings.variants.by_model_name(options.endpoint, DEFAULT_MODEL_NAME).id,
                       image_url=image_url[:2048] if isinstance(image_url, str) else "", params=JobParams())
        admit(gw, principal, request_id, None, options)
        gw.store.create(spec)
        finish_job(settings=settings, store=gw.store, objects=None, celery=gw.celery, spec=spec,
                   body={"detail": exc.details}, code=422, error=exc.details[0]["msg"],
                   error_type=exc.details[0]["type"])
        return Submitted(request_id, spec.variant, rejected=True)

    spec = JobSpec(**common, variant=variant.id, image_url=image_url, params=JobParams.from_input(parsed),
                   mask_cache_scope=mask_cache_scope(principal))
    admit(gw, principal, request_id, variant.id, options)
    gw.store.create(spec)
    pipe = gw.redis.pipeline()
    if spec.start_deadline:
        pipe.zadd(keys.DEADLINES, {request_id: spec.start_deadline})
    pipe.zadd(keys.OUTPUTS, {f"req:{request_id}": now + output_ttl})  # outputs, and a large inline input
    pipe.execute()
    try:
        send_job(gw.celery, spec)
    except Exception as exc:
        # Not enqueued: end the record rather than leave it IN_QUEUE forever; the caller may retry.
        finish_job(settings=settings, store=gw.store, objects=None, celery=gw.celery, spec=spec,
                   body={"detail": "Could not reach the job queue", "error_type": "runner_connection_error"},
                   code=503, error="Could not reach the job queue", error_type="runner_connection_error")
        raise FalError.flat(503, "Could not reach the job queue", "runner_connection_error",
                            request_id=request_id) from exc
    wait_for_replicas(gw.redis, settings)  # with Sentinel: a failover now must not forget the job
    return Submitted(request_id, spec.variant, rejected=False)


def admit(gw: Gateway, principal: Principal, request_id: str, variant: str | None, options: SubmitOptions) -> None:
    """429 in fal's error shape, with Retry-After, when a limit of the key or the queue cap says no."""
    refusal = gw.limiter.admit(key_id=principal.key_id, request_id=request_id, variant=variant,
                               max_concurrent=principal.max_concurrent,
                               requests_per_minute=principal.requests_per_minute,
                               max_queue_length=options.max_queue_length)
    if refusal is not None:
        raise FalError.flat(429, refusal.message, refusal.reason, headers={"Retry-After": str(refusal.retry_after)})
