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

import numpy as np
import redis
from botocore.exceptions import BotoCoreError, ClientError
from celery import Celery

from common.adapters.fetch import fetch_input
from common.adapters.netguard import NetPolicy
from common.adapters.storage import RESULT_DOCUMENT, ObjectStore
from common.domain.errors import JobError, RequestCancelled, RequestTimeout, RunnerDisconnected
from common.domain.schemas import ImageFile, JobSpec
from common.observability.metrics import count_job_run
from common.settings import WorkerSettings
from common.state.job_progress import job_finished
from common.state.jobs import Claim, Completed, JobStore, RunReport, log_entry
from common.state.results import fail_job, finish_job
from worker.batcher import ForwardTimeout, MaskBatcher, WorkerUnavailable
from worker.engine import Predictor
from worker.job_context import JobContext
from worker.leases import LeaseKeeper, WorkerHealth
from worker.masks import MaskSource, ObtainedMask
from worker.outcome import TIMEOUT_ERROR_TYPE, JobTimedOut, Outcome
from worker.pipeline.decode import decode_rgb
from worker.pipeline.encode import check_output_format, supported_formats
from worker.pipeline.postprocess import postprocess
from worker.pipeline.render import render
from worker.pipeline.types import EncodedImage, EncodeOptions, Mask
from worker.run_overrides import RunOverrides

log = logging.getLogger(__name__)

_TRANSIENT = (BotoCoreError, redis.ConnectionError, redis.TimeoutError)


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return status >= 500 or status == 0
    return isinstance(exc, _TRANSIENT)


class JobRunner:
    def __init__(
        self,
        settings: WorkerSettings,
        store: JobStore,
        objects: ObjectStore,
        celery: Celery,
        predictors: dict[str, Predictor],
        worker_name: str,
        overrides: RunOverrides | None = None,
        limits: redis.Redis | None = None,
    ):
        self.settings = settings
        self.limits = limits if limits is not None else store.redis  # where per-key limits live
        self.overrides = overrides or RunOverrides.off()
        self.output_formats = supported_formats()  # what this worker's encoders can write
        self.encoding = EncodeOptions.from_settings(settings)
        self.batchers = {
            variant: MaskBatcher(
                predictor, max_size=settings.max_batch_size, wait_seconds=settings.batch_wait_ms / 1000
            )
            for variant, predictor in predictors.items()
        }
        self.health = WorkerHealth()
        self.health.on_trip(self._stop_inference)
        # Jobs running now: request id -> deadline of this run (time.monotonic()), for the watchdog.
        self.running: dict[str, float] = {}
        self._running_lock = threading.Lock()
        self._ended: dict[str, Completed] = {}  # request id -> the completion its running run recorded
        self.store = store
        self.objects = objects
        self.celery = celery
        self.predictors = predictors
        self.worker_name = worker_name
        self.net_policy = NetPolicy.from_settings(settings)
        self.masks = MaskSource(settings, store, objects)

    def _finish(self, spec: JobSpec, token: str, **kwargs) -> Completed | None:
        run = (kwargs.get("extra") or {}).get("timings", {}).get("total")
        completed = finish_job(
            settings=self.settings,
            store=self.store,
            objects=self.objects,
            spec=spec,
            token=token,
            report=self.report("done", run),
            **kwargs,
        )
        self.ended(spec.request_id, completed)
        return completed

    def _end(self, spec: JobSpec, token: str, exc: JobError) -> Completed | None:
        outcome = "cancelled" if isinstance(exc, RequestCancelled) else "failed"
        completed = fail_job(
            exc=exc,
            settings=self.settings,
            store=self.store,
            objects=self.objects,
            spec=spec,
            token=token,
            report=self.report(outcome),
        )
        self.ended(spec.request_id, completed)
        return completed

    def report(self, outcome: str, run_seconds: float | None = None) -> RunReport:
        """The completions-stream entry of a run of this worker that ends its job (`outcome`: its kind)."""
        return RunReport(outcome, self.worker_name, run_seconds, self.settings.ops_completions_kept)

    def ended(self, request_id: str, completed: Completed | None) -> None:
        """Note the completion a run recorded: `run` hands it to job_finished (metrics) once it returns."""
        if completed is not None:
            with self._running_lock:
                self._ended[request_id] = completed

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
        # For ops and metrics: the claim puts the job in the running set, the completion takes it out and
        # appends to the completions stream; then the stage histograms (timings come with `done` outcomes).
        outcome = Outcome("retry", "raised")
        try:
            outcome = self._run_job(spec)
        finally:
            with self._running_lock:
                completed = self._ended.pop(spec.request_id, None)
            if completed is not None and completed.cancelled and outcome.kind in ("done", "failed"):
                outcome = Outcome("cancelled", "cancelled while it ran: its completion recorded the cancel")
            completion = job_finished(self.store, spec, outcome.kind, completed)
            count_job_run(spec.variant, outcome.kind, completion, outcome.timings)
        return outcome

    def _run_job(self, spec: JobSpec) -> Outcome:
        token = uuid.uuid4().hex
        max_attempts = min(
            spec.max_attempts or self.settings.max_job_attempts, self.settings.max_job_attempts
        )

        image = spec.extra.get("video") is None  # (a video's segments write its lines too)
        predictor = self.predictors.get(spec.variant)
        # An image run's first line goes with its claim: every run shows in the log, even a killed one.
        first_line = log_entry(predictor.log_prefix + "loading image") if image and predictor else ""

        def claim_it():
            return self.store.claim(
                spec.request_id,
                spec.variant,
                token,
                lease_seconds=self.settings.job_lease_seconds,
                max_attempts=max_attempts,
                worker=self.worker_name,
                sole_log_writer=image,
                first_line=first_line,
            )

        claim = claim_it()
        if claim.outcome == "missing":  # the record was lost with Redis data: the message has the whole spec
            self.store.ensure(spec)
            claim = claim_it()
        if claim.outcome == "completed":
            return Outcome("skipped", "already completed")
        if claim.outcome == "leased":
            return Outcome("defer", "another worker holds the lease")
        if claim.outcome == "exhausted":
            self.store.dead_letter(spec.request_id)
            last, last_type = self.store.last_error(spec.request_id)
            last = last or "worker stopped"
            if last_type == TIMEOUT_ERROR_TYPE:
                message = (
                    f"the job's last attempt ended at its run-time limit ({last}); {max_attempts} "
                    "attempts were allowed, so it was moved to the dead-letter list"
                )
                self._end(spec, "", RequestTimeout(message))
                return Outcome("failed", "attempts exhausted (run-time limit)")
            if spec.max_attempts == 1:
                message = (
                    f"the job's first run ended without a result (last: {last}) and the request asked "
                    "for no retries (x-fal-no-retry); it was moved to the dead-letter list"
                )
            else:
                message = (
                    f"the job failed {max_attempts} times (last: {last}); "
                    "it was moved to the dead-letter list"
                )
            self._end(spec, "", RunnerDisconnected(message))
            return Outcome("failed", "attempts exhausted")
        if claim.outcome == "missing":
            return Outcome("skipped", "job record missing")

        limit = self.settings.time_limit(spec.variant)
        deadline = time.monotonic() + limit
        with self._running_lock:
            self.running[spec.request_id] = deadline
        try:
            with LeaseKeeper(
                self.store, spec.request_id, spec.variant, token, self.settings.job_lease_seconds, self.health
            ):
                return self._run_leased(spec, token, deadline, limit, claim)
        finally:
            with self._running_lock:
                self.running.pop(spec.request_id, None)

    def _run_leased(self, spec: JobSpec, token: str, deadline: float, limit: float, claim: Claim) -> Outcome:
        try:
            try:
                return self._run_claimed(spec, token, deadline, limit, claim)
            except JobError as exc:  # storing the error can meet an outage too: handled below
                return self._fail(spec, token, exc)
            except (JobTimedOut, ForwardTimeout) as exc:
                return self._timed_out(spec, token, limit, exc)
            except WorkerUnavailable as exc:
                # Not the job's fault: refund the attempt and let another worker take it at once.
                # The line first: once requeued, the next holder numbers the job's lines.
                self.store.log(spec.request_id, f"handed to another worker: {exc}", "WARN")
                self.store.requeue(spec.request_id, spec.variant, token, refund_attempt=True)
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
            self.health.trip(
                f"a forward of {spec.variant} ran past the {limit:.0f}s run-time limit "
                f"(job {spec.request_id})"
            )
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
        stored = self.objects.find(self.settings.output_bucket, key)
        if stored is None or stored.metadata.get("status") != "OK":
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

    def _run_claimed(self, spec: JobSpec, token: str, deadline: float, limit: float, claim: Claim) -> Outcome:
        if spec.start_deadline and time.time() > spec.start_deadline:
            self._end(spec, token, RequestTimeout())
            return Outcome("failed", "start deadline passed")
        if self._reuse_existing(spec, token):
            return Outcome("done", "reused")
        predictor = self.predictors.get(spec.variant)
        if predictor is None:
            raise JobError(
                f"this worker does not serve variant {spec.variant!r}",
                error_type="runner_scheduling_failure",
                status_code=503,
            )
        check_output_format(spec.params.output_format, self.output_formats)  # a 422 before any work
        ctx = JobContext.open(spec, self.store, predictor, self.overrides)
        if spec.extra.get("video") is not None:
            from worker.video.job import run_video_job  # PyAV loads only where video jobs run

            return run_video_job(self, spec, token, deadline, limit, predictor, ctx.log_now, claim)
        try:
            return self._run_image(spec, token, deadline, ctx, claim)
        finally:
            ctx.flush_quietly()

    def _run_image(
        self, spec: JobSpec, token: str, deadline: float, ctx: JobContext, claim: Claim
    ) -> Outcome:
        """The image job's stages: fetch, decode, mask (network, cache or kept), render, upload."""
        params, predictor, settings = spec.params, ctx.predictor, self.settings
        if claim.cancel_requested:  # a cancel came while an earlier run held the job: nothing to fetch
            self._end(spec, token, RequestCancelled())
            return Outcome("cancelled")
        # ("loading image", this run's first line, was written with the claim)
        with ctx.stage("fetch"):
            data = fetch_input(
                spec.image_url,
                objects=self.objects,
                max_bytes=settings.max_input_bytes,
                policy=self.net_policy,
                version_id=spec.input_version,
                if_match=spec.input_etag,
                timeout=settings.http_timeout,
            )
        with ctx.stage("decode"):
            rgb = decode_rgb(data, max_pixels=settings.max_input_pixels, max_side=settings.max_input_side)
        background = self._background(spec)
        _check_deadline(deadline, "the download and decode")

        size = (rgb.shape[1], rgb.shape[0])
        ctx.announce_inference(size)
        if claim.watched:  # a caller follows the job: its lines so far now; otherwise they go at the end
            ctx.flush()
        obtained: list[ObtainedMask] = []
        with ctx.timed(lambda: "mask_reuse" if obtained and obtained[0].source != "network" else "inference"):
            obtained.append(
                self.masks.obtain(
                    spec,
                    data,
                    size,
                    resolution=ctx.resolution,
                    weights=predictor.weights_description,
                    compute=lambda: self._infer(spec, rgb, ctx.size, claim.run_alone, deadline),
                )
            )
        mask = obtained[0]
        if mask.source != "network":
            ctx.log(mask.detail)
            log.info("job %s: %s", spec.request_id, mask.detail)
        if mask.batch_size > 1:
            ctx.log(f"ran in a batch of {mask.batch_size}")
        # A cancel is honoured by the completion in any case; reading the flag again (one command) saves the
        # render and upload, worth it only once the claim's reading of it is `cancel_check_interval` old.
        if time.time() - claim.started_at >= settings.cancel_check_interval and self._cancelled(spec, token):
            return Outcome("cancelled")

        with ctx.stage("render"):
            rendered = render(
                rgb,
                mask.mask,
                params,
                encoding=self.encoding,
                background=background,
                max_side=settings.max_input_side,
                max_pixels=settings.max_input_pixels,
            )
        _check_deadline(deadline, "rendering the outputs")

        ctx.log("uploading" if not params.sync_mode else "encoding data URIs")
        with ctx.stage("upload"):
            body: dict[str, object] = {
                "image": self._publish(spec, rendered.image, "mask" if params.mask_only else "cutout"),
                "mask_image": self._publish(spec, rendered.mask, "mask") if rendered.mask else None,
            }
        if predictor.result_warning:
            body["warning"] = predictor.result_warning
        timings = ctx.finish()
        # fal's inference_time: the network's seconds, or reading a reused mask's (no network run).
        self._finish(
            spec,
            token,
            body=body,
            inference_time=timings.get("inference", timings.get("mask_reuse")),
            extra={"timings": timings, "weights": predictor.weights_description, "mask_source": mask.source},
            logs=ctx.take_lines(),
        )
        return Outcome("done", timings=timings)

    def _infer(
        self, spec: JobSpec, rgb: np.ndarray, resolution: tuple[int, int], alone: bool, deadline: float
    ) -> tuple[Mask, int]:
        """The network's mask: prepare (this thread), the batched forward (the batcher's), postprocess."""
        batcher = self.batchers[spec.variant]
        prepared = batcher.predictor.prepare(rgb, resolution)
        logits, batch_size = batcher.infer(
            prepared, timeout=max(0.0, deadline - time.monotonic()), alone=alone
        )
        return postprocess(logits, prepared), batch_size

    def _background(self, spec: JobSpec) -> np.ndarray | None:
        """The decoded background_image_url (same fetcher, decoder, guards and limits as image_url), or
        None."""
        url = spec.params.background_image_url
        if not url:
            return None
        self.store.log(spec.request_id, "loading background image")
        try:
            data = fetch_input(
                url,
                objects=self.objects,
                max_bytes=self.settings.max_input_bytes,
                policy=self.net_policy,
                timeout=self.settings.http_timeout,
            )
            return decode_rgb(
                data, max_pixels=self.settings.max_input_pixels, max_side=self.settings.max_input_side
            )
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
            self.objects.write(
                self.settings.output_bucket,
                key,
                encoded.data,
                encoded.content_type,
                metadata={"request-id": spec.request_id},
            )
            url = self.objects.url_for(
                self.settings.output_bucket, key, ttl=spec.extra.get("output_ttl"), api=spec.source == "api"
            )
        return ImageFile(
            url=url,
            content_type=encoded.content_type,
            file_name=file_name,
            file_size=encoded.file_size,
            width=encoded.width,
            height=encoded.height,
        ).model_dump()


def _check_deadline(deadline: float, stage: str) -> None:
    if time.monotonic() > deadline:
        raise JobTimedOut(f"the limit passed during {stage}")
