"""Where a job's mask comes from: the network, the content cache, or an earlier request's kept mask.

- **Kept mask** (mask reuse): every job that stores its outputs also keeps its mask (8-bit PNG) and, for API
  requests, its input bytes under `<output prefix>kept/`, with a manifest the gateway's compose route reads.
  They live and die with the request's other output files (the gateway's retention sweep deletes the prefix).
  A compose job (`JobSpec.reuse_from`) renders from them without running the network.
- **Content cache**: the same image bytes with the same variant, weights and operating resolution, in the
  same cache scope (`JobSpec.mask_cache_scope`: an API key's own, `shared`, or `uploads`), reuse the mask of
  the first job for `mask_cache_seconds`. Entries are a Redis key (with that TTL) naming an S3 object under
  `<output_prefix>cache/`, whose deletion is scheduled on the gateway's file sweep. A job that finds an
  identical job running the network waits for its mask instead of computing it again.

Masks are 8-bit (worker.pipeline.types.Mask) from the network on, so a mask read back from its PNG renders
exactly the pixels of the first run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import numpy as np
import redis
from botocore.exceptions import ClientError

from common.adapters.storage import KEPT_INPUT, KEPT_MANIFEST, KEPT_MASK, ObjectStore, parse_s3_url
from common.domain.errors import FileDownloadError
from common.domain.schemas import JobSpec
from common.observability.metrics import MASKS
from common.settings import WorkerSettings
from common.state import keys
from common.state.jobs import JobStore
from worker.pipeline.decode import read_mask_png
from worker.pipeline.encode import encode_png
from worker.pipeline.types import Mask

log = logging.getLogger(__name__)

MASK_PNG_LEVEL = 3


@dataclass(frozen=True)
class ObtainedMask:
    mask: Mask
    source: str  # "network" | "cache" | "compose"
    batch_size: int = 1
    detail: str = ""


def mask_png(alpha8: np.ndarray) -> bytes:
    """A mask as kept and cached: an 8-bit grey PNG."""
    return encode_png(alpha8, MASK_PNG_LEVEL)


def cache_key(scope: str, data: bytes, variant: str, resolution: str, weights: str) -> str:
    identity = json.dumps(
        {"s": scope, "i": hashlib.sha256(data).hexdigest(), "v": variant, "r": resolution, "w": weights},
        sort_keys=True,
    )
    return keys.mask_cache(hashlib.sha256(identity.encode()).hexdigest()[:40])


class MaskSource:
    def __init__(self, settings: WorkerSettings, store: JobStore, objects: ObjectStore):
        self.settings = settings
        self.store = store
        self.objects = objects

    @property
    def redis(self) -> redis.Redis:
        return self.store.redis

    def obtain(
        self,
        spec: JobSpec,
        data: bytes,
        size: tuple[int, int],
        *,
        resolution: str,
        weights: str,
        compute: Callable[[], tuple[Mask, int]],
    ) -> ObtainedMask:
        """The job's mask for its input of `size` (W, H); `compute` runs the network (returns the mask and its
        batch size)."""
        if spec.reuse_from:
            obtained = ObtainedMask(
                self._kept_mask(spec, size),
                "compose",
                detail=f"mask of request {spec.reuse_from}; the network did not run",
            )
        else:
            obtained = self._cached_or_computed(spec, data, size, resolution, weights, compute)
        MASKS.labels(spec.variant, obtained.source).inc()
        self._keep(spec, data, obtained.mask.alpha8, resolution)
        return obtained

    def _kept_mask(self, spec: JobSpec, size: tuple[int, int]) -> Mask:
        url = spec.extra.get("kept_mask", "")
        try:
            bucket, key = parse_s3_url(url)
            mask = Mask(
                read_mask_png(self.objects.read(bucket, key, max_bytes=self.settings.max_input_bytes * 4))
            )
        except (ValueError, FileDownloadError) as exc:
            raise FileDownloadError(
                f"the kept mask of request {spec.reuse_from} is no longer available "
                f"(its output retention ended?): {exc}",
                field="request_id",
            ) from None
        if mask.size != size:
            raise FileDownloadError(
                f"the kept mask of request {spec.reuse_from} does not match its input", field="request_id"
            )
        return mask

    def _cached_or_computed(
        self,
        spec: JobSpec,
        data: bytes,
        size: tuple[int, int],
        resolution: str,
        weights: str,
        compute: Callable[[], tuple[Mask, int]],
    ) -> ObtainedMask:
        scope = spec.mask_cache_scope if self.settings.mask_cache_seconds > 0 else None
        if not scope:
            mask, batch = compute()
            return ObtainedMask(mask, "network", batch)
        key = cache_key(scope, data, spec.variant, resolution, weights)
        lock = key + ":computing"
        hit = self._lookup(key, size)
        if hit is None and not self.redis.set(
            lock, spec.request_id, nx=True, ex=max(1, int(self.settings.mask_cache_wait_seconds))
        ):
            holder = cast(str | None, self.redis.get(lock)) or "another job"  # a decoding client: str replies
            self.store.log(
                spec.request_id, f"request {holder} is computing the mask of this image; waiting for it"
            )
            hit = self._wait(key, lock, size)
            if hit is None:
                self.redis.set(lock, spec.request_id, ex=max(1, int(self.settings.mask_cache_wait_seconds)))
        if hit is not None:
            mask, origin = hit
            return ObtainedMask(
                mask,
                "cache",
                detail=f"mask from the content cache (computed by request {origin}); the network did not run",
            )
        try:
            mask, batch = compute()
            self._store(key, spec, mask.alpha8)
        finally:
            self.redis.delete(lock)
        return ObtainedMask(mask, "network", batch)

    def _lookup(self, key: str, size: tuple[int, int]) -> tuple[Mask, str] | None:
        raw = self.redis.get(key)
        if not raw:
            return None
        entry = json.loads(raw)
        try:
            mask = Mask(
                read_mask_png(
                    self.objects.read(
                        self.settings.output_bucket, entry["key"], max_bytes=self.settings.max_input_bytes * 4
                    )
                )
            )
        except (FileDownloadError, ClientError, OSError, KeyError):
            log.warning("mask cache entry %s points at a missing object; recomputing", key)
            self.redis.delete(key)
            return None
        if mask.size != size:
            return None
        return mask, entry.get("request_id", "?")

    def _wait(self, key: str, lock: str, size: tuple[int, int]) -> tuple[Mask, str] | None:
        deadline = time.monotonic() + self.settings.mask_cache_wait_seconds
        while time.monotonic() < deadline:
            hit = self._lookup(key, size)
            if hit is not None:
                return hit
            if not self.redis.exists(lock):  # the other job finished without a mask (failed)
                return self._lookup(key, size)
            time.sleep(0.1)
        return None

    def _store(self, key: str, spec: JobSpec, alpha8: np.ndarray) -> None:
        lifetime = self.settings.mask_cache_seconds
        object_key = f"{self.settings.output_prefix}cache/{key[len(keys.MASK_CACHE_PREFIX) :]}.png"
        self.objects.write(
            self.settings.output_bucket,
            object_key,
            mask_png(alpha8),
            "image/png",
            metadata={"request-id": spec.request_id},
        )
        pipe = self.redis.pipeline()
        pipe.zadd(keys.OUTPUTS, {f"obj:{object_key}": time.time() + lifetime})
        pipe.set(
            key,
            json.dumps({"key": object_key, "request_id": spec.request_id, "at": time.time()}),
            ex=lifetime,
        )
        pipe.execute()

    def _keep(self, spec: JobSpec, data: bytes, alpha8: np.ndarray, resolution: str) -> None:
        """Keep the mask (and for API requests the input and a manifest) with the request's outputs."""
        if spec.params.sync_mode:
            return  # sync_mode stores nothing
        bucket = self.settings.output_bucket
        if spec.reuse_from:
            mask_url, input_url = spec.extra["kept_mask"], spec.image_url  # the source's files
        else:
            mask_url = f"s3://{bucket}/{spec.output_prefix}{KEPT_MASK}"
            self.objects.write(
                bucket,
                spec.output_prefix + KEPT_MASK,
                mask_png(alpha8),
                "image/png",
                metadata={"request-id": spec.request_id},
            )
            input_url = spec.image_url
            stored_by_gateway = f"s3://{bucket}/{spec.output_prefix}"
            if spec.source == "api" and not input_url.startswith(stored_by_gateway):
                input_url = f"s3://{bucket}/{spec.output_prefix}{KEPT_INPUT}"
                self.objects.write(
                    bucket,
                    spec.output_prefix + KEPT_INPUT,
                    data,
                    "application/octet-stream",
                    metadata={"request-id": spec.request_id},
                )
        if spec.source != "api":
            return  # compose is an API route: bucket uploads keep their mask only (for the cache and people)
        manifest = {
            "request_id": spec.request_id,
            "owner": spec.owner,
            "variant": spec.variant,
            "endpoint": spec.endpoint,
            "operating_resolution": resolution,
            "input": input_url,
            "mask": mask_url,
            "width": int(alpha8.shape[1]),
            "height": int(alpha8.shape[0]),
            "created_at": time.time(),
        }
        self.objects.write_json(
            bucket, spec.output_prefix + KEPT_MANIFEST, manifest, metadata={"request-id": spec.request_id}
        )
