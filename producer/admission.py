"""The one way into the job queue, for S3 events (producer/intake.py) and API submit, run and compose alike:
`validate_input` checks the parameters (one resolution check), `Admission.enqueue` admits, records and
queues the job, or completes it at once with its rejection's own error body (as fal answers invalid input).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from celery import Celery
from fastapi.encoders import jsonable_encoder
from pydantic import ValidationError

from common.adapters.queue import job_message, send_job
from common.adapters.redis_conn import wait_for_replicas
from common.adapters.storage import ObjectStore
from common.domain.auth import Principal
from common.domain.errors import InputErrors, JobError, QueueUnreachable
from common.domain.schemas import INPUT_MODELS, BiRefNetInput, JobSpec
from common.domain.variants import VariantSpec
from common.settings import GatewaySettings, ProducerSettings, VariantSettings
from common.state import keys
from common.state.jobs import JobStore
from common.state.limits import Limiter, QueueFull, admitted_units
from common.state.results import fail_job

log = logging.getLogger(__name__)

# The words every boolean header, query flag and x-amz-meta value accepts (any case, blanks around ignored).
TRUE_WORDS, FALSE_WORDS = frozenset({"1", "true", "yes", "on"}), frozenset({"0", "false", "no", "off"})


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
    return jsonable_encoder(
        [{**err, "loc": ("body", *err.get("loc", ()))} for err in exc.errors(include_url=False)]
    )


def validate_input(
    endpoint: str, data: dict, settings: VariantSettings, variant: VariantSpec | None = None
) -> tuple[BiRefNetInput, VariantSpec]:
    """The input and its variant (`variant`: chosen by id, not by `model`), or InputErrors (FastAPI's
    list)."""
    try:
        parsed = INPUT_MODELS[endpoint].model_validate(data)
        variant = variant or settings.variants.by_model_name(endpoint, parsed.model.value)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise InputErrors(validation_details(exc)) from exc
    except KeyError as exc:
        raise InputErrors([detail(["body", "model"], str(exc.args[0]), "value_error")]) from None
    model_name = variant.fal_names.get(endpoint, variant.id)  # type: ignore[call-overload]
    check_resolution_allowed(parsed.operating_resolution.value, variant, model_name)
    return parsed, variant


def check_resolution_allowed(resolution: str, variant: VariantSpec, model_name: str) -> None:
    """InputErrors unless the variant runs at this operating_resolution."""
    if resolution not in variant.allowed_resolutions:
        raise InputErrors(
            [
                detail(
                    ["body", "operating_resolution"],
                    f"Value error, {resolution} is not supported by "
                    f"'{model_name}' (allowed: {', '.join(variant.allowed_resolutions)})",
                    "value_error",
                    input=resolution,
                )
            ]
        )


@dataclass(frozen=True)
class Submitted:
    request_id: str
    variant: str
    rejected: bool  # invalid input: already COMPLETED with its error
    queue_position: int | None = None  # when it was queued (0 = next); None: not queued by this call


@dataclass(frozen=True)
class Admission:
    settings: GatewaySettings | ProducerSettings
    store: JobStore
    celery: Celery
    limiter: Limiter
    objects: ObjectStore | None = None  # where result documents go (None: the job record only)

    def enqueue(
        self,
        spec: JobSpec,
        *,
        rejection: JobError | None = None,
        principal: Principal | None = None,
        max_queue_length: int | None = None,
        schedule: Mapping[str, tuple[str, float]] | None = None,
        prepare: Callable[[], None] | None = None,
        watched: bool = False,
    ) -> Submitted:
        """Queue `spec`'s job (adding `schedule`: sorted set -> (member, due)), or complete it with
        `rejection`.

        API requests (`principal`): the key's limits and queue caps (LimitRefused, no job); an unreachable
        queue ends the job (QueueUnreachable). S3 events: the configured cap (QueueFull: the sender keeps the
        event); a redelivered event's unfinished job is sent again (a worker runs a job at most once).
        `prepare` (e.g. storing a large inline input) runs once the job is admitted, before it is recorded: a
        refused request stores nothing. `watched`: the caller waits on the job (a sync run): its record is
        created marked so."""
        if principal is not None:  # rejected input never waits in a queue: no queue cap applies to it
            refusal = self.limiter.admit(
                key_id=principal.key_id,
                request_id=spec.request_id,
                variant=None if rejection else spec.variant,
                max_concurrent=principal.max_concurrent,
                requests_per_minute=principal.requests_per_minute,
                max_queue_length=max_queue_length,
                units=admitted_units(spec.extra),
            )
            if refusal is not None:
                raise refusal
        elif (
            rejection is None
            and not self.limiter.queue_has_room(spec.variant)
            and not self.store.redis.exists(keys.job(spec.request_id))
        ):
            raise QueueFull(spec.variant, self.settings.queue_full_retry_after)
        if prepare is not None and rejection is None:
            prepare()
        # The record, its queue entry, its Celery message and the schedules' bookings (a queued job's only) in
        # one round trip, with the queue position an API submit answers. With Celery's task events on, Celery
        # sends the message itself (its task-sent event goes with it).
        bookings = schedule if rejection is None else None
        message = None
        if rejection is None and not self.settings.celery_task_events:
            message = job_message(self.celery, spec)
        if principal is not None and rejection is None:  # a request id just minted
            position = self.store.create_queued(spec, bookings, message=message, watched=watched)
            created = True
        else:
            position, created = None, self.store.create(spec, bookings, message=message)
        if rejection is not None:
            if created:
                log.warning(
                    "job %s for %s rejected: %s", spec.request_id, spec.image_url[:200], rejection.message
                )
                self._end(spec, rejection)
            return Submitted(spec.request_id, spec.variant, rejected=True)
        if not created:  # a redelivered event: its job's message is sent again unless it ended
            record = self.store.get(spec.request_id)
            if record is None or record.status == "COMPLETED":
                return Submitted(spec.request_id, spec.variant, rejected=False)
        if message is None or not created:
            try:
                send_job(self.celery, spec)
            except Exception as exc:
                if principal is None:
                    raise
                self._end(spec, QueueUnreachable())  # not IN_QUEUE forever; the caller may retry
                raise QueueUnreachable() from exc
        wait_for_replicas(self.store.redis, self.settings)  # with Sentinel: a failover now must not forget it
        log.info("job %s queued on %s", spec.request_id, spec.queue)
        return Submitted(spec.request_id, spec.variant, rejected=False, queue_position=position)

    def _end(self, spec: JobSpec, error: JobError) -> None:
        fail_job(exc=error, settings=self.settings, store=self.store, objects=self.objects, spec=spec)
