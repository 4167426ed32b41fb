"""Bucket uploads of videos: a key with a video suffix (or an upload whose Content-Type is video/*) becomes
a `fal-ai/birefnet/v2/video` job, with its options from x-amz-meta-* as for images (video_output_type,
video_quality, video_write_mode, output_mask, model, ...); results go to the output bucket and the webhook."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import ValidationError

from common.adapters.storage import ObjectInfo, fingerprint, s3_url, upload_output_prefix
from common.domain.errors import InvalidInputError, JobError
from common.domain.schemas import JobParams, JobSpec
from common.domain.video import VIDEO_SUFFIXES, BiRefNetVideoInput, VideoOptions

if TYPE_CHECKING:
    from producer.intake import Intake
    from producer.notifications import ObjectCreated

VIDEO_PARAM_KEYS = (
    "video_output_type",
    "video_quality",
    "video_write_mode",
    "background_color",
    "output_mask",
    "refine_foreground",
    "model",
    "operating_resolution",
    "webhook_url",
)


def is_video_upload(key: str, content_type: str | None = None) -> bool:
    return key.lower().endswith(VIDEO_SUFFIXES) or (content_type or "").lower().startswith("video/")


def enqueue_video(intake: Intake, event: ObjectCreated, info: ObjectInfo, version_id: str | None) -> str:
    settings, metadata = intake.settings, info.metadata
    params: dict[str, object] = {}
    for prefix in sorted(settings.prefix_defaults, key=len):
        if event.key.startswith(prefix):
            params.update(settings.prefix_defaults[prefix])
    for name in VIDEO_PARAM_KEYS:
        for meta_name in (name, name.replace("_", "-")):
            if meta_name in metadata:
                params[name] = metadata[meta_name]
    webhook_url = params.pop("webhook_url", None)
    video_url = s3_url(event.bucket, event.key, version_id)
    error: JobError | None = None
    variant_id = settings.variants.by_model_name("v2", "General Use (Light)").id
    job_params, options = JobParams(), VideoOptions()
    try:
        data = BiRefNetVideoInput.model_validate({**params, "video_url": video_url})
        variant_id = settings.variants.by_model_name("v2", data.model.value).id
        job_params = JobParams(
            operating_resolution=data.operating_resolution.value,
            output_mask=data.output_mask,
            refine_foreground=data.refine_foreground,
        )
        options = VideoOptions.from_input(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        field = str(first["loc"][0]) if first.get("loc") else "video_url"
        error = InvalidInputError(f"invalid x-amz-meta-{field}: {first['msg']}", field=field)
    except KeyError as exc:
        error = InvalidInputError(f"invalid x-amz-meta-model: {exc.args[0]}", field="model")
    pin = version_id or info.etag or info.version
    fp = fingerprint(
        event.bucket,
        event.key,
        pin,
        {"p": job_params.model_dump(), "v": variant_id, "video": options.model_dump(), "e": str(error or "")},
    )
    request_id = intake.job_id(variant_id, fp)
    spec = JobSpec(
        request_id=request_id,
        endpoint="v2",
        variant=variant_id,
        image_url=video_url,
        params=job_params,
        source="s3_event",
        output_prefix=upload_output_prefix(settings, event.key, fp),
        input_fingerprint=fp,
        input_version=version_id,
        input_etag=None if version_id else (info.etag or None),
        webhook_url=str(webhook_url) if webhook_url else None,
        owner="s3",
        extra={"sequencer": event.sequencer, "event_source": event.source, "video": options.model_dump()},
    )
    return intake.enqueue(spec, rejection=error)
