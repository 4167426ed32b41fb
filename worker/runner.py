"""Runs one job on a warm predictor: claim, fetch, infer, store, complete.

Kept free of Celery so that the same code runs in tests, benchmarks and the Celery task.
What happens to the job is returned as an `Outcome`; the Celery task turns `defer` and `retry`
into Celery retries.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import redis
from botocore.exceptions import BotoCoreError, ClientError
from celery import Celery
from PIL import Image

from common.adapters.fetch import fetch_input
from common.adapters.netguard import NetPolicy
from common.adapters.storage import RESULT_DOCUMENT, ObjectStore
from common.domain.errors import JobError, RequestCancelled, RequestTimeout, RunnerDisconnected
from common.domain.schemas import ImageFile, JobSpec
from common.observability.metrics import count_job_run
from common.settings import Settings
from common.state.job_progress import job_finished, job_started
from common.state.jobs import JobStore, log_entry
from common.state.results import fail_job, finish_job
from worker.batcher import ForwardHook, ForwardTimeout, MaskBatcher, WorkerUnavailable
from worker.compose import check_output_format, render_job_outputs
from worker.engine import Predictor
from worker.imaging import EncodedImage, decode_image
from worker.masks import MaskSource
from worker.null_model import NULL_MODEL_BANNER
from worker.pixels import decode_rgb
from worker.rendering import DeviceMask, quantise_device_mask
from worker.test_hooks import HooksForTests

log = logging.getLogger(__name__)

OutcomeKind = Literal["done", "failed", "cancelled", "skipped", "defer", "retry", "handback"]

UNTRAINED_WARNING = ("UNTRAINED WEIGHTS: this result was computed with recipe (random) weights, not a "
                     "trained BiRefNet checkpoint; the mask is meaningless.")


@dataclass
class Outcome:
    kind: OutcomeKind
    detail: str = ""
    timings: dict[str, float] = field(default_factory=dict)


class JobTimedOut(Exception):
    """This run of the job passed its run-time limit; the attempt counts (see JobRunner._timed_out)."""


TIMEOUT_ERROR_TYPE = RequestTimeout.error_type  # fal: "exceeded the allowed processing time"


class WorkerHealth:
    """Whether this worker still takes jobs. Tripped once (by the watchdog, or by a job whose forward ran
    past its limit); from then on jobs are handed back, leases are no longer renewed, and the worker exits."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self._tripped = threading.Event()
        self._listeners: list = []

    @property
    def tripped(self) -> bool:
        return self._tripped.is_set()

    def on_trip(self, listener) -> None:
        self._listeners.append(listener)

    def trip(self, reason: str) -> None:
        if self._tripped.is_set():
            return
        self.reason = reason
        self._tripped.set()
        log.critical("worker is stuck and stops taking jobs: %s", reason)
        for listener in self._listeners:
            try:
                listener(reason)
            except Exception:
                log.exception("a watchdog listener failed")


_TRANSIENT = (BotoCoreError, redis.ConnectionError, redis.TimeoutError)


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return status >= 500 or status == 0
    return isinstance(exc, _TRANSIENT)


class LeaseKeeper:
    """Renews the job's lease in the background while it runs, so no other worker takes it."""

    def __init__(self, store: JobStore, request_id: str, token: str, lease_seconds: float,
                 health: WorkerHealth | None = None):
        self.store, self.request_id, self.token, self.lease_seconds = store, request_id, token, lease_seconds
        self.health = health
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{request_id[:8]}", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.lease_seconds / 3):
            if self.health is not None and self.health.tripped:
                return  # a stuck worker lets its leases run out, so other workers can take the jobs
            try:
                self.store.renew(self.request_id, self.token, self.lease_seconds)
            except redis.RedisError:
                log.warning("could not renew the lease of %s", self.request_id)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


class JobRunner:
    def __init__(self, settings: Settings, store: JobStore, objects: ObjectStore, celery: Celery,
                 predictors: dict[str, Predictor], worker_name: str, forward_hook: ForwardHook | None = None,
                 hooks: HooksForTests | None = None):
        self.settings = settings
        self.hooks = hooks or HooksForTests.off()
        self.batchers = {variant: MaskBatcher(predictor, max_size=settings.max_batch_size,
                                              wait_seconds=settings.batch_wait_ms / 1000, forward_hook=forward_hook)
                         for variant, predictor in predictors.items()}
        self.health = WorkerHealth()
        self.health.on_trip(self._stop_inference)
        # Jobs running now: request id -> deadline of this run (time.monotonic()), for the watchdog.
        self.running: dict[str, float] = {}
        self._running_lock = threading.Lock()
        self.store = store
        self.objects = objects
        self.celery = celery
        self.predictors = predictors
        self.worker_name = worker_name
        self.net_policy = NetPolicy.from_settings(settings)
        self.masks = MaskSource(settings, store, objects)

    def _finish(self, spec: JobSpec, token: str, **kwargs) -> bool:
        return finish_job(settings=self.settings, store=self.store, objects=self.objects, spec=spec, token=token,
                          **kwargs)

    def _end(self, spec: JobSpec, token: str, exc: JobError) -> bool:
        return fail_job(exc=exc, settings=self.settings, store=self.store, objects=self.objects, spec=spec,
                        token=token)

    def _stop_inference(self, reason: str) -> None:
        for batcher in self.batchers.values():
            batcher.declare_stuck(reason)

    def extend_deadline(self, request_id: str, deadline: float) -> None:
        """A job whose run-time limit grows once its size is known (videos: with their duration)."""
        with self._running_lock:
            if request_id in self.running:
                self.running[request_id] = deadline

    def running_jobs(self) -> dict[str, float]:
        with self._running_lock:
            return dict(self.running)

    def run(self, spec: JobSpec) -> Outcome:
        if self.health.tripped:  # stuck: take nothing more (the Celery task puts the message back)
            return Outcome("handback", f"worker is stuck: {self.health.reason}")
        # For ops and metrics: the running set while it runs, then the completions stream and the stage
        # histograms (timings come with `done` outcomes).
        job_started(self.store, spec)
        outcome = Outcome("retry", "raised")
        try:
            outcome = self._run_job(spec)
            return outcome
        finally:
            completion = job_finished(self.store, spec, outcome.kind, outcome.timings, worker=self.worker_name,
                                      keep=self.settings.ops_completions_kept)
            count_job_run(spec.variant, outcome.kind, completion, outcome.timings)

    def _run_job(self, spec: JobSpec) -> Outcome:
        token = uuid.uuid4().hex
        max_attempts = min(spec.max_attempts or self.settings.max_job_attempts, self.settings.max_job_attempts)

        def claim_it():
            return self.store.claim(spec.request_id, spec.variant, token,
                                    lease_seconds=self.settings.job_lease_seconds,
                                    max_attempts=max_attempts, worker=self.worker_name)

        claim = claim_it()
        if claim == "missing":  # the record was lost with Redis data: the message carries the whole spec
            self.store.ensure(spec)
            claim = claim_it()
        if claim == "completed":
            return Outcome("skipped", "already completed")
        if claim == "leased":
            return Outcome("defer", "another worker holds the lease")
        if claim == "exhausted":
            self.store.dead_letter(spec.request_id)
            last, last_type = self.store.last_error(spec.request_id)
            last = last or "worker stopped"
            if last_type == TIMEOUT_ERROR_TYPE:
                message = (f"the job's last attempt ended at its run-time limit ({last}); {max_attempts} "
                           "attempts were allowed, so it was moved to the dead-letter list")
                self._end(spec, "", RequestTimeout(message))
                return Outcome("failed", "attempts exhausted (run-time limit)")
            if spec.max_attempts == 1:
                message = (f"the job's first run ended without a result (last: {last}) and the request asked "
                           "for no retries (x-fal-no-retry); it was moved to the dead-letter list")
            else:
                message = (f"the job failed {max_attempts} times (last: {last}); "
                           "it was moved to the dead-letter list")
            self._end(spec, "", RunnerDisconnected(message))
            return Outcome("failed", "attempts exhausted")
        if claim == "missing":
            return Outcome("skipped", "job record missing")

        limit = self.settings.time_limit(spec.variant)
        deadline = time.monotonic() + limit
        with self._running_lock:
            self.running[spec.request_id] = deadline
        try:
            with LeaseKeeper(self.store, spec.request_id, token, self.settings.job_lease_seconds, self.health):
                return self._run_leased(spec, token, deadline, limit)
        finally:
            with self._running_lock:
                self.running.pop(spec.request_id, None)

    def _run_leased(self, spec: JobSpec, token: str, deadline: float, limit: float) -> Outcome:
        try:
            try:
                return self._run_claimed(spec, token, deadline, limit)
            except JobError as exc:  # storing the error can meet an outage too: handled below
                return self._fail(spec, token, exc)
            except (JobTimedOut, ForwardTimeout) as exc:
                return self._timed_out(spec, token, limit, exc)
            except WorkerUnavailable as exc:
                # Not the job's fault: refund the attempt and let another worker take it at once.
                self.store.requeue(spec.request_id, spec.variant, token, refund_attempt=True)
                self.store.log(spec.request_id, f"handed to another worker: {exc}", "WARN")
                return Outcome("handback", str(exc))
        except Exception as exc:
            transient = _is_transient(exc)
            # An outage is not the job's fault: refund the attempt so outages do not exhaust it.
            self.store.requeue(spec.request_id, spec.variant, token, refund_attempt=transient)
            if transient:
                log.warning("job %s hit a transient error, will retry: %s", spec.request_id, exc)
                return Outcome("retry", f"transient: {exc}")
            log.exception("job %s raised unexpectedly", spec.request_id)
            self.store.note_error(spec.request_id, f"{type(exc).__name__}: {exc}")
            return Outcome("retry", f"{type(exc).__name__}: {exc}")

    def _timed_out(self, spec: JobSpec, token: str, limit: float, exc: Exception) -> Outcome:
        """This run passed its limit: the attempt counts and the job goes back to the queue; once its
        attempts are used up, the next claim ends it with fal's 504 request_timeout and dead-letters it."""
        message = f"the run took longer than its run-time limit of {limit:.0f}s ({exc})"
        shared = isinstance(exc, ForwardTimeout) and exc.shared
        if shared:
            # Batched with other jobs, one of which may be the culprit: not charged, and run alone next time
            # so that only the job that hangs by itself uses up its attempts.
            message += "; it shared that forward with other jobs, so it runs alone next time, not charged"
        log.warning("job %s: %s", spec.request_id, message)
        self.store.log(spec.request_id, f"error: {message}", "ERROR")
        self.store.note_error(spec.request_id, message, TIMEOUT_ERROR_TYPE, run_alone=shared)
        self.store.requeue(spec.request_id, spec.variant, token, refund_attempt=shared)
        if isinstance(exc, ForwardTimeout):
            # The inference thread has not come back within a whole job's limit: it is stuck.
            self.health.trip(f"a forward of {spec.variant} ran past the {limit:.0f}s run-time limit "
                             f"(job {spec.request_id})")
        return Outcome("retry", message)

    def _fail(self, spec: JobSpec, token: str, exc: JobError) -> Outcome:
        log.warning("job %s failed: %s (%s)", spec.request_id, exc.message, exc.error_type)
        self.store.log(spec.request_id, f"error: {exc.message}", "ERROR")
        self._end(spec, token, exc)
        return Outcome("failed", exc.message)

    def _reuse_existing(self, spec: JobSpec, token: str) -> bool:
        """A finished result for the same input version and parameters is not computed again."""
        if not spec.input_fingerprint or spec.params.sync_mode:
            return False
        key = spec.output_prefix + RESULT_DOCUMENT
        try:
            head = self.objects.client.head_object(Bucket=self.settings.output_bucket, Key=key)
        except ClientError:
            return False
        if head.get("Metadata", {}).get("status") != "OK":
            return False
        body = self.objects.read_json(self.settings.output_bucket, key)
        if body is None:
            return False
        self.store.log(spec.request_id, "result already exists for this input version; reusing it")
        self._finish(spec, token, body=body, extra={"reused": True})
        return True

    def _cancelled(self, spec: JobSpec, token: str) -> bool:
        if not self.store.cancel_requested(spec.request_id):
            return False
        self._end(spec, token, RequestCancelled())
        return True

    def _run_claimed(self, spec: JobSpec, token: str, deadline: float, limit: float) -> Outcome:
        if spec.start_deadline and time.time() > spec.start_deadline:
            self._end(spec, token, RequestTimeout())
            return Outcome("failed", "start deadline passed")
        if self._reuse_existing(spec, token):
            return Outcome("done", "reused")
        predictor = self.predictors.get(spec.variant)
        if predictor is None:
            raise JobError(f"this worker does not serve variant {spec.variant!r}",
                           error_type="runner_scheduling_failure", status_code=503)
        params = spec.params
        check_output_format(params.output_format, self.hooks.unsupported_output_formats)  # a 422 before any work
        banner = f"[{NULL_MODEL_BANNER}] " if predictor.null_model else ""
        if spec.extra.get("video") is not None:
            # A video reports progress while it runs (frames, segments): its lines go out as they come.
            def log_now(request_id: str, message: str, level: str = "INFO") -> None:
                self.store.log(request_id, banner + message, level)

            from worker.video.job import run_video_job  # PyAV loads only where video jobs run
            return run_video_job(self, spec, token, deadline, limit, predictor, log_now)
        timings: dict[str, float] = {}
        # Log lines are written per stage, not per line: those up to the forward just before it runs (what a
        # caller watching sees while it waits), the rest with the completion, in its round trip.
        lines: list[str] = []

        def log_(request_id: str, message: str, level: str = "INFO") -> None:
            lines.append(log_entry(banner + message, level))

        try:
            return self._run_stages(spec, token, deadline, predictor, timings, lines, log_)
        finally:
            try:
                self.store.log_many(spec.request_id, lines)  # what a failed stage had not written yet
            except redis.RedisError:
                log.warning("could not write the log lines of %s", spec.request_id)

    def _run_stages(self, spec: JobSpec, token: str, deadline: float, predictor: Predictor,
                    timings: dict[str, float], lines: list[str], log_) -> Outcome:
        params = spec.params
        rid = spec.request_id

        started = time.perf_counter()
        log_(rid, "loading image")
        data = fetch_input(spec.image_url, objects=self.objects, max_bytes=self.settings.max_input_bytes,
                           policy=self.net_policy, version_id=spec.input_version, if_match=spec.input_etag,
                           timeout=self.settings.http_timeout)
        timings["fetch"] = time.perf_counter() - started
        t = time.perf_counter()
        rgb = decode_rgb(data, max_pixels=self.settings.max_input_pixels, max_side=self.settings.max_input_side)
        image = Image.fromarray(rgb)  # the mask cache and the extended output stage take PIL images
        timings["decode"] = time.perf_counter() - t
        background = self._background(spec)
        cancel, alone = self.store.run_flags(rid)  # one round trip for both
        if cancel:
            self._end(spec, token, RequestCancelled())
            return Outcome("cancelled")
        _check_deadline(deadline, "the download and decode")

        resolution = self.hooks.operating_resolution or params.operating_resolution
        width, height = (int(v) for v in resolution.split("x"))
        if not spec.reuse_from:
            log_(rid, f"inference {resolution} on {predictor.device} ({image.width}x{image.height} input)")
        if resolution != params.operating_resolution:
            log_(rid, f"TEST MODE: ran at {resolution}, not {params.operating_resolution} "
                      "(BIREFNET_TEST_OPERATING_RESOLUTION)", "WARN")
        if predictor.untrained and not predictor.null_model:
            log_(rid, UNTRAINED_WARNING, "WARN")
        t = time.perf_counter()
        on_device: list[DeviceMask] = []
        self.store.log_many(rid, lines)
        lines.clear()

        def compute():
            mask, batch, prepared = self.batchers[spec.variant].predict_prepared(
                image, (width, height), alone=alone, timeout=max(0.0, deadline - time.monotonic()))
            if isinstance(mask, np.ndarray):
                return mask, batch
            device_mask, host = quantise_device_mask(mask, prepared)  # CUDA: the mask stays on the device
            on_device.append(device_mask)
            return host, batch

        obtained = self.masks.obtain(spec, data, image, resolution=resolution,
                                     weights=predictor.weights_description, compute=compute)
        mask, batch_size = obtained.mask, obtained.batch_size
        timings["inference" if obtained.source == "network" else "mask_reuse"] = time.perf_counter() - t
        if obtained.source != "network":
            log_(rid, obtained.detail)
            log.info("job %s: %s", rid, obtained.detail)
        if batch_size > 1:
            log_(rid, f"ran in a batch of {batch_size}")
        if self._cancelled(spec, token):
            return Outcome("cancelled")

        t = time.perf_counter()
        rendered = render_job_outputs(predictor, image, mask, params, background=background,
                                      device_mask=on_device[0] if on_device else None)
        timings["render"] = time.perf_counter() - t
        _check_deadline(deadline, "rendering the outputs")

        log_(rid, "uploading" if not params.sync_mode else "encoding data URIs")
        t = time.perf_counter()
        body: dict[str, object] = {"image": self._publish(spec, rendered.image, "mask" if params.mask_only else "cutout"),
                      "mask_image": self._publish(spec, rendered.mask, "mask") if rendered.mask else None}
        if predictor.null_model:
            body["warning"] = NULL_MODEL_BANNER
        elif predictor.untrained:
            body["warning"] = UNTRAINED_WARNING
        timings["upload"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - started
        log_(rid, f"done in {timings['total']:.2f}s")
        # fal's inference_time: the network's seconds, or reading a reused mask's (no network run).
        self._finish(spec, token, body=body, inference_time=timings.get("inference", timings.get("mask_reuse")),
                     extra={"timings": timings, "weights": predictor.weights_description,
                            "mask_source": obtained.source}, logs=list(lines))
        lines.clear()
        return Outcome("done", timings=timings)

    def _background(self, spec: JobSpec):
        """The decoded background_image_url (same fetcher, guards and limits as image_url), or None."""
        url = spec.params.background_image_url
        if not url:
            return None
        self.store.log(spec.request_id, "loading background image")
        try:
            data = fetch_input(url, objects=self.objects, max_bytes=self.settings.max_input_bytes,
                               policy=self.net_policy, timeout=self.settings.http_timeout)
            return decode_image(data, max_pixels=self.settings.max_input_pixels, max_side=self.settings.max_input_side)
        except JobError as exc:
            exc.field = "background_image_url"
            exc.message = f"background_image_url: {exc.message}"
            raise

    def _publish(self, spec: JobSpec, encoded: EncodedImage, stem: str) -> dict:
        file_name = f"{stem}{encoded.extension}"
        if spec.params.sync_mode:
            url = f"data:{encoded.content_type};base64,{base64.b64encode(encoded.data).decode()}"
        else:
            key = spec.output_prefix + file_name
            self.objects.write(self.settings.output_bucket, key, encoded.data, encoded.content_type,
                               metadata={"request-id": spec.request_id})
            url = self.objects.url_for(self.settings.output_bucket, key, ttl=spec.extra.get("output_ttl"),
                                       api=spec.source == "api")
        return ImageFile(url=url, content_type=encoded.content_type, file_name=file_name,
                         file_size=encoded.file_size, width=encoded.width, height=encoded.height).model_dump()


def _check_deadline(deadline: float, stage: str) -> None:
    if time.monotonic() > deadline:
        raise JobTimedOut(f"the limit passed during {stage}")
