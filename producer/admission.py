"""The one way into the job queue: parameters + image source -> a job accepted (queued) or rejected.

S3 events (producer/intake.py) and every API route that makes a job (queue submit, sync run, compose) use it:

- `validate_input`: the model input and its variant, with the one resolution check; problems raise
  `InputErrors` (FastAPI's exact 422 `detail` list).
- `Admission.enqueue`: limits, then the job record, then the Celery message. Invalid input becomes a job
  that is COMPLETED at once with its error's own body (fal answers invalid input that way too).
  API requests meet their key's limits and the queue caps (`LimitRefused`: 429, no job); an S3 event meets
  the configured queue cap (`QueueFull`: its sender keeps the event until there is room).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from celery import Celery
from fastapi.encoders import jsonable_encoder
from pydantic import ValidationError

from common.adapters.queue import send_job
from common.adapters.redis_conn import wait_for_replicas
from common.adapters.storage import ObjectStore
from common.domain.errors import InputErrors, JobError, LimitRefused, QueueUnreachable
from common.domain.schemas import INPUT_MODELS, BiRefNetInput, JobSpec
from common.domain.variants import VariantSpec
from common.settings import Settings
from common.state.jobs import JobStore
from common.state.limits import Limiter, QueueFull
from common.state.results import fail_job

log = logging.getLogger(__name__)

# Every boolean header, query flag and x-amz-meta value reads these words (any case, blanks around ignored).
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off"})


def parse_bool(text: str) -> bool | None:
    """True or False for a boolean word, None for any other text."""
    word = text.strip().lower()
    return True if word in TRUE_WORDS else False if word in FALSE_WORDS else None


def flag(value: str | None) -> bool:
    """An optional boolean header or query value: set only by a true word."""
    return parse_bool(value or "") is True


def detail(loc: list, msg: str, type_: str, **extra: object) -> dict:
    """One entry of FastAPI's 422 `detail` list."""
    return {"type": type_, "loc": loc, "msg": msg, **extra}


def validation_details(exc: ValidationError) -> list[dict]:
    """A model's validation errors as FastAPI reports a request body's."""
    errors = [{**err, "loc": ("body", *err.get("loc", ()))} for err in exc.errors(include_url=False)]
    return jsonable_encoder(errors)


def validate_input(endpoint: str, data: dict, settings: Settings,
                   variant: VariantSpec | None = None) -> tuple[BiRefNetInput, VariantSpec]:
    """The validated input and its variant (`variant`: one chosen by id rather than by `model`), or
    InputErrors carrying FastAPI's `detail` list."""
    try:
        parsed = INPUT_MODELS[endpoint].model_validate(data)
    except ValidationError as exc:
        raise InputErrors(validation_details(exc)) from exc
    if variant is None:
        try:
            variant = settings.variants.by_model_name(endpoint, parsed.model.value)  # type: ignore[arg-type]
        except KeyError as exc:
            raise InputErrors([detail(["body", "model"], str(exc.args[0]), "value_error")]) from None
    resolution = parsed.operating_resolution.value
    if resolution not in variant.allowed_resolutions:
        name = variant.fal_names.get(endpoint, variant.id)  # type: ignore[call-overload]
        raise InputErrors([detail(["body", "operating_resolution"],
                                  f"Value error, {resolution} is not supported by '{name}' "
                                  f"(allowed: {', '.join(variant.allowed_resolutions)})", "value_error",
                                  input=resolution)])
    return parsed, variant


@dataclass(frozen=True)
class KeyLimits:
    """The limits an API request is admitted under: its key's, and its own queue cap (fal_max_queue_length)."""

    key_id: str
    max_concurrent: int | None = None
    requests_per_minute: int | None = None
    max_queue_length: int | None = None


@dataclass(frozen=True)
class Submitted:
    request_id: str
    variant: str
    rejected: bool  # invalid input: already COMPLETED with its error


@dataclass(frozen=True)
class Admission:
    settings: Settings
    store: JobStore
    celery: Celery
    limiter: Limiter
    objects: ObjectStore | None = None  # where results documents go (None: the job record only)

    def enqueue(self, spec: JobSpec, *, rejection: JobError | None = None, limits: KeyLimits | None = None,
                schedule: Mapping[str, tuple[str, float]] | None = None) -> Submitted:
        """Create `spec`'s job and queue it, or complete it at once with `rejection`.

        `limits`: an API request's (LimitRefused when one says no); None for an S3 event, whose sender
        keeps it while the queue is full (QueueFull) and delivers it again, so a job that exists already
        is queued again unless completed. `schedule`: sorted set -> (member, due) written for a queued job.
        A queue that cannot be reached ends an API request's job (QueueUnreachable); an event's stays queued.
        """
        self._admit(spec, rejection, limits)
        created = self.store.create(spec)
        if rejection is not None:
            if created:
                log.warning("job %s for %s rejected: %s", spec.request_id, spec.image_url[:200], rejection.message)
                self._end(spec, rejection)
            return Submitted(spec.request_id, spec.variant, rejected=True)
        if not created:
            record = self.store.get(spec.request_id)
            if record is None or record.status == "COMPLETED":
                return Submitted(spec.request_id, spec.variant, rejected=False)
            # Re-sending for an unfinished job is safe: a worker runs a job at most once (see common.state.jobs).
        elif schedule:
            pipe = self.store.redis.pipeline()
            for key, (member, due) in schedule.items():
                pipe.zadd(key, {member: due})
            pipe.execute()
        try:
            send_job(self.celery, spec)
        except Exception as exc:
            if limits is None:
                raise
            # Not enqueued: end the record rather than leave it IN_QUEUE forever; the caller may retry.
            self._end(spec, QueueUnreachable())
            raise QueueUnreachable() from exc
        wait_for_replicas(self.store.redis, self.settings)  # with Sentinel: a failover now must not forget it
        log.info("job %s queued on %s", spec.request_id, spec.queue)
        return Submitted(spec.request_id, spec.variant, rejected=False)

    def _admit(self, spec: JobSpec, rejection: JobError | None, limits: KeyLimits | None) -> None:
        if limits is None:
            if rejection is None and not self.limiter.queue_has_room(spec.variant) \
                    and not self.store.redis.exists(self.store.job_key(spec.request_id)):
                raise QueueFull(spec.variant, self.settings.queue_full_retry_after)
            return
        # Rejected input never waits in a queue, so no queue cap applies to it.
        refusal = self.limiter.admit(key_id=limits.key_id, request_id=spec.request_id,
                                     variant=None if rejection else spec.variant,
                                     max_concurrent=limits.max_concurrent,
                                     requests_per_minute=limits.requests_per_minute,
                                     max_queue_length=limits.max_queue_length)
        if refusal is not None:
            raise LimitRefused(refusal.message, refusal.reason, refusal.retry_after)

    def _end(self, spec: JobSpec, error: JobError) -> None:
        fail_job(exc=error, settings=self.settings, store=self.store, objects=self.objects, celery=self.celery,
                 spec=spec)
