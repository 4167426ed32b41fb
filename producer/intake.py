"""Turns a created input object into exactly one job, however often its event is delivered.

Each job is pinned to the content its event names: its version id (HEAD and GET that version; else the
version id the HEAD answers), or its ETag (HEAD and the worker's GET with If-Match: an object overwritten
first ends that job as superseded, and the newer upload's event makes its own job). The `sequencer` orders
the events of an unversioned key: an older one naming other content is superseded without a runnable job.
Results live under the fingerprint (uploads/<key>/<fingerprint>/), so no job ever replaces another's.

With Redis shards a job is recorded and queued on its variant's shard, under a request id naming that
shard; what belongs to an object rather than to a job (the sequencer of its key, the job of each upload)
stays on shard 0."""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, replace
from typing import cast

from botocore.exceptions import ClientError
from celery import Celery

from common.adapters.queue import make_celery
from common.adapters.storage import ObjectInfo, ObjectStore, fingerprint, s3_url, upload_output_prefix
from common.domain.errors import FileDownloadError, InputErrors, InvalidInputError, JobError
from common.domain.schemas import JobParams, JobSpec
from common.domain.variants import is_endpoint
from common.observability.metrics import PRODUCER_EVENTS
from common.settings import ProducerSettings
from common.state import keys
from common.state.jobs import JobStore
from common.state.limits import Limiter, QueueFull
from common.state.shards import ShardMap, settings_for
from producer.admission import Admission, parse_bool, validate_input
from producer.notifications import ObjectCreated
from producer.video_intake import enqueue_video, is_video_upload

log = logging.getLogger(__name__)

# User metadata (x-amz-meta-<name>) that sets job parameters.
PARAM_KEYS = (
    "model",
    "operating_resolution",
    "output_format",
    "output_mask",
    "refine_foreground",
    "mask_only",
    "webhook_url",
    "endpoint",
    # extension fields (common.domain.extensions)
    "background_color",
    "background_image_url",
    "background_fit",
    "crop_to_subject",
    "crop_margin",
    "crop_aspect_ratio",
    "crop_threshold",
)


def _coerce(value: object) -> object:
    """Metadata values are strings; booleans arrive as words (producer.admission.parse_bool)."""
    if isinstance(value, str):
        boolean = parse_bool(value)
        return value.strip() if boolean is None else boolean
    return value


def job_parameters(settings: ProducerSettings, key: str, metadata: dict[str, str]) -> dict[str, object]:
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


_NOT_FOUND = ("404", "NoSuchKey", "NotFound", "NoSuchVersion")
_PRECONDITION = ("412", "PreconditionFailed")
_REFUSED = ("400", "InvalidArgument", "InvalidRequest", "NoSuchBucket", "InvalidBucketName")
_HEX = re.compile(r"^[0-9A-Fa-f]{1,64}$")

# Newest sequencer handled per unversioned key (hash seq, etag): replaced only by a newer one.
_SEQUENCE = """
local seq = redis.call('HGET', KEYS[1], 'seq')
if seq and seq > ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'seq', ARGV[1], 'etag', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _sequence_value(sequencer: str | None) -> str | None:
    """S3's sequencer, comparable as a string: upper-case hex left-padded to one length (AWS: pad, then
    compare lexicographically)."""
    if not sequencer or not _HEX.match(sequencer):
        return None
    return sequencer.upper().rjust(64, "0")


def check_upload_background(url: str | None, bucket: str) -> None:
    """An upload's metadata may name an s3:// background only in its own bucket: whoever can upload must not
    be able to have the worker read (and publish) other buckets' objects. http(s) URLs meet the SSRF guard."""
    if url and url.lower().startswith("s3://") and not url.startswith(f"s3://{bucket}/"):
        raise InvalidInputError(
            f"background_image_url may only name objects in s3://{bucket}/ (the upload's bucket)",
            field="background_image_url",
        )


@dataclass(frozen=True)
class IntakeShard:
    """Where the jobs of one shard's variants are recorded and queued."""

    store: JobStore
    admission: Admission


class Intake:
    def __init__(
        self,
        settings: ProducerSettings,
        shards: list[tuple[JobStore, Celery]],
        objects: ObjectStore,
        shard_map: ShardMap | None = None,
    ):
        """`shards`: each shard's job store and Celery sender, by shard index (one: unsharded)."""
        self.settings, self.objects = settings, objects
        self.shard_map = shard_map or ShardMap.from_settings(settings.model_copy(update={"redis_shards": []}))
        self.store = shards[0][0]  # shard 0: per-object state (sequencers, an upload's job)
        routed = len(shards) > 1
        self.limiter = Limiter(self.store.redis, settings, queues=self._queue_redis if routed else None)
        self.shards = [
            IntakeShard(store, Admission(settings, store, celery, self.limiter, objects))
            for store, celery in shards
        ]
        self._sequence = self.store.redis.register_script(_SEQUENCE)

    def _queue_redis(self, variant: str):
        return self.on_variant(variant).store.redis

    def on_variant(self, variant: str) -> IntakeShard:
        return self.shards[self.shard_map.for_variant(variant).index]

    def job_id(self, variant: str, object_fingerprint: str) -> str:
        """The request id of the job for this fingerprint, on `variant`'s shard (a fresh one the first
        time)."""
        store = self.on_variant(variant).store
        return store.job_for_object(object_fingerprint, self.shard_map.new_request_id(variant))

    def enqueue(self, spec: JobSpec, rejection: JobError | None = None) -> str:
        return self.on_variant(spec.variant).admission.enqueue(spec, rejection=rejection).request_id

    def ignore_reason(self, event: ObjectCreated) -> str | None:
        """Why an event makes no job, or None when it should."""
        s = self.settings
        buckets = s.accepted_input_buckets
        if event.bucket == s.output_bucket and (
            event.bucket not in buckets or event.key.startswith(s.output_prefix)
        ):
            return (
                f"it is in the output bucket {s.output_bucket!r} (our own results are never processed again)"
            )
        if event.bucket not in buckets:
            return (
                f"bucket {event.bucket!r} is not an input bucket (accepted: {', '.join(buckets)}; "
                "set BIREFNET_INPUT_BUCKETS)"
            )
        prefixes = s.input_prefixes.get(event.bucket)
        if prefixes and not event.key.startswith(tuple(prefixes)):
            return (
                f"the key is outside bucket {event.bucket!r}'s input prefixes {prefixes} "
                "(BIREFNET_INPUT_PREFIXES)"
            )
        if not event.key.lower().endswith(tuple(x.lower() for x in s.image_suffixes)) and not is_video_upload(
            event.key
        ):
            return "not an image key (its suffix is not in BIREFNET_IMAGE_SUFFIXES)"
        return None

    def _head(self, event: ObjectCreated) -> ObjectInfo:
        if event.version_id:
            return self.objects.head(event.bucket, event.key, version_id=event.version_id)
        return self.objects.head(event.bucket, event.key, if_match=event.etag)

    def _locate(self, event: ObjectCreated) -> tuple[ObjectCreated, ObjectInfo | None, str]:
        """The event (its key as found), the object version it names, and '' - or None and why not:
        'gone', 'superseded' or a refusal."""
        try:
            return event, self._head(event), ""
        except ClientError as exc:
            code = _code(exc)
            if code in _NOT_FOUND and event.alt_key:  # EventBridge: the key may have come un-encoded
                event = replace(event, key=event.alt_key, alt_key=None)
                try:
                    return event, self._head(event), ""
                except ClientError as again:
                    exc, code = again, _code(again)
            if code in _NOT_FOUND:
                return event, None, "gone"
            if code in _PRECONDITION:
                return event, None, "superseded"
            if code in _REFUSED:
                return event, None, f"refused by the object store ({code})"
            raise

    def handle(self, event: ObjectCreated) -> str | None:
        """Enqueue the job for one created object; returns its request id (None when ignored).

        Raises on transient failures (S3 or Redis unreachable) so the caller keeps the event.
        """
        named = s3_url(event.bucket, event.key, event.version_id)
        reason = self.ignore_reason(event)
        if reason:
            log.info("ignoring %s (%s): %s", named, event.event_name, reason)
            return None
        if not event.version_id:
            stale = self._stale(event)  # before any S3 call: a stale event needs none
            if stale:
                return self._superseded(event, stale)
        located, info, problem = self._locate(event)
        if located.key != event.key:  # found under the key's other reading: apply the rules to that one
            reason = self.ignore_reason(located)
            if reason:
                log.info(
                    "ignoring %s (%s): %s", s3_url(located.bucket, located.key), event.event_name, reason
                )
                return None
        event = located
        if problem == "gone":
            log.warning("%s is gone (deleted before its event was handled); event dropped", named)
            return None
        if problem == "superseded":
            return self._superseded(
                event, "its content was replaced by a newer upload before the event was handled"
            )
        if info is None:
            log.warning("%s: %s; event dropped", named, problem)
            return None
        version_id = event.version_id or info.version_id
        if version_id is None:
            self._record_sequence(event, info)
        return self._enqueue(event, info, version_id)

    def _sequence_key(self, event: ObjectCreated) -> str:
        digest = hashlib.sha256(f"{event.bucket}\0{event.key}".encode()).hexdigest()[:32]
        return keys.key_sequence(digest)

    def _stale(self, event: ObjectCreated) -> str | None:
        """Why an unversioned event is older than one already handled for its key (and names other
        content), else None."""
        seq = _sequence_value(event.sequencer)
        if seq is None or not event.etag:
            return None
        newest, newest_etag = cast(
            list[str | None], self.store.redis.hmget(self._sequence_key(event), ["seq", "etag"])
        )  # a decoding client: str replies
        if newest and newest > seq and newest_etag != event.etag:
            return (
                f"an upload with a later sequencer (ETag {newest_etag}) was handled first; this event "
                f"(sequencer {event.sequencer}) is stale"
            )
        return None

    def _record_sequence(self, event: ObjectCreated, info: ObjectInfo) -> None:
        seq = _sequence_value(event.sequencer)
        if seq is not None:
            self._sequence(
                keys=[self._sequence_key(event)], args=[seq, info.etag, self.settings.job_record_ttl]
            )

    def _upload_key(self, event: ObjectCreated, pin: str) -> str:
        digest = hashlib.sha256(f"{event.bucket}\0{event.key}\0{pin}".encode()).hexdigest()[:32]
        return keys.upload(digest)

    def _superseded(self, event: ObjectCreated, why: str) -> str:
        """End the job of an upload that was overwritten before anything could read it (one per upload)."""
        pin = event.etag or f"seq:{event.sequencer}"
        existing = cast(
            str | None, self.store.redis.get(self._upload_key(event, pin))
        )  # a decoding client: str replies
        if existing:
            return existing  # this upload already has its job (a redelivered event)
        fp = fingerprint(event.bucket, event.key, pin, {"superseded": True})
        variant = self.settings.worker_variants[0]
        request_id = self.job_id(variant, fp)
        named = s3_url(event.bucket, event.key)
        spec = JobSpec(
            request_id=request_id,
            endpoint=self.settings.default_endpoint,
            variant=variant,
            image_url=named,
            params=JobParams(),
            source="s3_event",
            output_prefix=upload_output_prefix(self.settings, event.key, fp),
            input_fingerprint=fp,
            input_etag=event.etag,
            owner="s3",
            extra={"sequencer": event.sequencer, "event_source": event.source},
        )
        error = FileDownloadError(
            f"superseded by a newer upload: {named} (ETag {event.etag}) was overwritten "
            f"before its job could read it; {why}. The newer upload has a job of its own"
        )
        return self.enqueue(spec, rejection=error)

    def _enqueue(self, event: ObjectCreated, info: ObjectInfo, version_id: str | None) -> str:
        if is_video_upload(event.key, info.content_type):
            return enqueue_video(self, event, info, version_id)
        params = job_parameters(self.settings, event.key, info.metadata)
        webhook_url = params.pop("webhook_url", None)
        endpoint = str(params.pop("endpoint", self.settings.default_endpoint))
        if not is_endpoint(endpoint):  # the keys of INPUT_MODELS
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
        image_url = s3_url(event.bucket, event.key, version_id)
        pin = version_id or info.etag or info.version
        error: JobError | None = None
        job_params = JobParams()
        try:
            data, variant = validate_input(
                endpoint,
                {**params, "image_url": image_url},
                self.settings,
                variants.get(variant_id) if variant_id else None,
            )
            job_params = JobParams.from_input(data)
            variant_id = variant.id
            check_upload_background(job_params.background_image_url, event.bucket)
        except InputErrors as exc:
            first = exc.details[0]
            field = str(first["loc"][1]) if len(first.get("loc", ())) > 1 else "image_url"
            error = InvalidInputError(f"invalid x-amz-meta-{field}: {first['msg']}", field=field)
        except InvalidInputError as exc:
            error = exc

        variant_id = variant_id or self.settings.worker_variants[0]
        fp = fingerprint(
            event.bucket,
            event.key,
            pin,
            {"p": job_params.model_dump(), "v": variant_id, "e": str(error or "")},
        )
        request_id = self.job_id(variant_id, fp)
        self.store.redis.set(
            self._upload_key(event, pin), request_id, nx=True, ex=self.settings.job_record_ttl
        )
        spec = JobSpec(
            request_id=request_id,
            endpoint=endpoint,
            variant=variant_id,
            image_url=image_url,
            params=job_params,
            source="s3_event",
            output_prefix=upload_output_prefix(self.settings, event.key, fp),
            input_fingerprint=fp,
            input_version=version_id,
            input_etag=None if version_id else (info.etag or None),
            webhook_url=str(webhook_url) if webhook_url else None,
            owner="s3",
            extra={"sequencer": event.sequencer, "event_source": event.source},
            mask_cache_scope=self.settings.mask_cache_uploads_scope,
        )
        # A full queue raises QueueFull: the event stays with its sender (SQS, MinIO) until there is room.
        return self.enqueue(spec, rejection=error)


def build_intake(settings: ProducerSettings) -> Intake:
    shard_map = ShardMap.from_settings(settings)
    own = [settings_for(settings, shard) if shard_map.sharded else settings for shard in shard_map.shards]
    return Intake(
        settings, [(JobStore.from_settings(s), make_celery(s)) for s in own], ObjectStore(settings), shard_map
    )


class CountingIntake:
    """Wraps an Intake to count events by outcome (`birefnet_producer_events_total{source=...}`); the SQS
    consumer and the HTTP endpoint both wrap theirs in it."""

    def __init__(self, intake: Intake, source: str):
        self.intake, self.source = intake, source

    def handle(self, event: ObjectCreated) -> str | None:
        try:
            request_id = self.intake.handle(event)
        except QueueFull:
            PRODUCER_EVENTS.labels(self.source, "deferred").inc()
            raise
        except Exception:
            PRODUCER_EVENTS.labels(self.source, "error").inc()
            raise
        PRODUCER_EVENTS.labels(self.source, "enqueued" if request_id else "ignored").inc()
        return request_id
