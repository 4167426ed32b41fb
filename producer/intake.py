"""Turns a created input object into exactly one job, however often its event is delivered."""

from __future__ import annotations

import logging
import uuid

from botocore.exceptions import ClientError
from celery import Celery
from pydantic import ValidationError

from common.errors import InvalidInputError
from common.jobs import JobStore
from common.queue import send_job
from common.results import fail_job
from common.schemas import INPUT_MODELS, JobParams, JobSpec
from common.settings import Settings
from common.storage import ObjectStore, fingerprint, upload_output_prefix
from producer.events import ObjectCreated

log = logging.getLogger(__name__)

# User metadata (x-amz-meta-<name>) that sets job parameters.
PARAM_KEYS = ("model", "operating_resolution", "output_format", "output_mask", "refine_foreground",
              "mask_only", "webhook_url", "endpoint",
              # extension fields (common.extensions)
              "background_color", "background_image_url", "background_fit", "crop_to_subject", "crop_margin",
              "crop_aspect_ratio", "crop_threshold")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _coerce(value: object) -> object:
    """Metadata values are strings; booleans arrive as 'true'/'false'."""
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        return value.strip()
    return value


def job_parameters(settings: Settings, key: str, metadata: dict[str, str]) -> dict[str, object]:
    """Per-prefix defaults (longest matching prefix wins), overridden by the object's metadata."""
    params: dict[str, object] = {}
    for prefix in sorted(settings.prefix_defaults, key=len):
        if key.startswith(prefix):
            params.update(settings.prefix_defaults[prefix])
    for name in PARAM_KEYS:
        for meta_name in (name, name.replace("_", "-")):
            if meta_name in metadata:
                params[name] = metadata[meta_name]
    return {name: _coerce(value) for name, value in params.items()}


def check_upload_background(url: str | None, bucket: str) -> None:
    """An upload's metadata may name an s3:// background only in its own bucket: whoever can upload must not
    be able to have the worker read (and publish) other buckets' objects. http(s) URLs meet the SSRF guard."""
    if url and url.lower().startswith("s3://") and not url.startswith(f"s3://{bucket}/"):
        raise InvalidInputError(f"background_image_url may only name objects in s3://{bucket}/ (the upload's bucket)",
                                field="background_image_url")


class Intake:
    def __init__(self, settings: Settings, store: JobStore, celery: Celery, objects: ObjectStore):
        self.settings = settings
        self.store = store
        self.celery = celery
        self.objects = objects

    def is_candidate(self, event: ObjectCreated) -> bool:
        if event.bucket == self.settings.output_bucket:
            return False  # never process our own outputs (a shared bucket would loop)
        return event.key.lower().endswith(tuple(s.lower() for s in self.settings.image_suffixes))

    def handle(self, event: ObjectCreated) -> str | None:
        """Enqueue the job for one created object; returns its request id (None when ignored).

        Raises on transient failures (S3 or Redis unreachable) so the caller keeps the event.
        """
        if not self.is_candidate(event):
            log.info("ignoring s3://%s/%s (not an image key)", event.bucket, event.key)
            return None
        try:
            info = self.objects.head(event.bucket, event.key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                log.warning("s3://%s/%s is gone; event dropped", event.bucket, event.key)
                return None
            raise
        params = job_parameters(self.settings, event.key, info.metadata)
        webhook_url = params.pop("webhook_url", None)
        endpoint = str(params.pop("endpoint", self.settings.default_endpoint))
        if endpoint not in INPUT_MODELS:
            endpoint = self.settings.default_endpoint
        variants = self.settings.variants
        variant_id: str | None = None
        model = params.get("model")
        if isinstance(model, str) and model not in variants.model_names(endpoint):
            try:  # a variant id that fal does not name (e.g. "hr")
                variant_id = variants.get(model).id
                params.pop("model")
            except KeyError:
                pass
        image_url = f"s3://{event.bucket}/{event.key}"
        error: InvalidInputError | None = None
        job_params = JobParams()
        try:
            data = INPUT_MODELS[endpoint].model_validate({**params, "image_url": image_url})
            job_params = JobParams.from_input(data)
            if variant_id is None:
                variant_id = variants.by_model_name(endpoint, data.model.value).id
            check_upload_background(job_params.background_image_url, event.bucket)
            resolution = job_params.operating_resolution
            if resolution not in variants.get(variant_id).allowed_resolutions:
                raise InvalidInputError(f"operating_resolution {resolution} is not allowed for this model",
                                        field="operating_resolution")
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            field = str(first["loc"][0]) if first.get("loc") else "image_url"
            error = InvalidInputError(f"invalid x-amz-meta-{field}: {first['msg']}", field=field)
        except (InvalidInputError, KeyError) as exc:
            error = exc if isinstance(exc, InvalidInputError) else InvalidInputError(str(exc), field="model")

        variant_id = variant_id or self.settings.worker_variants[0]
        fp = fingerprint(event.bucket, event.key, info.version,
                         {"p": job_params.model_dump(), "v": variant_id, "e": str(error or "")})
        request_id = self.store.job_for_object(fp, str(uuid.uuid4()))
        spec = JobSpec(
            request_id=request_id, endpoint=endpoint, variant=variant_id, image_url=image_url,  # type: ignore[arg-type]
            params=job_params, source="s3_event", output_prefix=upload_output_prefix(self.settings, event.key, fp),
            input_fingerprint=fp, webhook_url=str(webhook_url) if webhook_url else None, owner="s3",
            mask_cache_scope=self.settings.mask_cache_uploads_scope,
        )
        created = self.store.create(spec)
        if error is not None:
            if created:
                log.warning("job %s for %s rejected: %s", request_id, image_url, error.message)
                fail_job(exc=error, settings=self.settings, store=self.store, objects=self.objects,
                         celery=self.celery, spec=spec)
            return request_id
        record = self.store.get(request_id)
        if created or (record is not None and record.status != "COMPLETED"):
            # Re-sending for an unfinished job is safe: a worker runs a job at most once (see common.jobs).
            send_job(self.celery, spec)
            log.info("job %s queued on %s for %s", request_id, spec.queue, image_url)
        return request_id
