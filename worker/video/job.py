"""One video job on a worker: fetch to a temporary file, probe, stream frames through the batcher (the
image path's per-frame stages: prepare, batched forward, mask resize, refinement), encode the outputs,
store them. Frames of one job run in parallel threads so that they share forwards (up to
max_batch_size a forward); the main thread writes them in order, so at most a window of frames is held.

Long videos are split by time into segments, each a job record of its own sent to the variant's queue:
any worker may take one (claim and lease as for any job), encodes its frames with the source's own
timestamps and stores the part in the output bucket. The worker that holds the video's own job takes the
segments nobody has taken yet, waits for the rest (a segment whose worker dies is taken again once its
lease lapses), then remuxes the parts in order, adds the audio track and completes the request."""

from __future__ import annotations

import base64
import math
import os
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from common.adapters.queue import send_job
from common.domain.errors import ImageTooLargeError, JobError, RequestCancelled
from common.domain.extensions import parse_hex_color
from common.domain.schemas import JobSpec
from common.domain.video import VideoFile, VideoOptions
from common.state.jobs import Claim
from common.state.limits import Limiter, admitted_units, video_units
from worker.leases import LeaseKeeper
from worker.outcome import JobTimedOut, Outcome
from worker.pipeline.postprocess import postprocess, to_mask
from worker.pipeline.render import cutout
from worker.pipeline.types import Mask
from worker.timings import StageTimings
from worker.video import codec

if TYPE_CHECKING:
    from worker.engine import Predictor
    from worker.runner import JobRunner

PROGRESS_EVERY = 2.0  # seconds between progress log lines
CANCEL_EVERY = 0.5  # seconds between cancellation checks
WAIT_POLL = 0.2  # seconds between looks at segments other workers hold


def render_frame(
    rgb: np.ndarray, mask: Mask | np.ndarray, *, refine: bool, alpha: bool, background: tuple[int, int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """(cutout pixels, grey mask) of one frame (a float mask is made 8-bit first): the image stage's
    cut-out, RGBA where the output keeps alpha, else laid on `background`."""
    mask = mask if isinstance(mask, Mask) else to_mask(mask)
    rgba = cutout(rgb, mask, refine=refine)
    if alpha:
        return rgba, mask.alpha8
    a = mask.alpha8[..., None].astype(np.float32) / 255.0
    out = rgba[..., :3].astype(np.float32) * a + np.asarray(background, np.float32) * (1.0 - a)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8), mask.alpha8


class Cancelled(Exception):
    """The request was cancelled while its frames ran."""


@dataclass
class VideoRun:
    runner: JobRunner
    spec: JobSpec  # the job being run (a segment's own, or the video's)
    token: str
    predictor: Predictor
    log_: object
    deadline: float
    options: VideoOptions
    kind: codec.OutputKind
    info: codec.VideoInfo | None = None
    source: str = ""
    tmp: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    # Per-frame stages, summed over frames and threads: decode, prepare, forward, postprocess, render, encode.
    stages: StageTimings = field(default_factory=StageTimings)
    alone: bool = False  # its claim's run_alone flag: each forward by itself

    @property
    def request_id(self) -> str:
        """The request the user sees (a segment logs to and is cancelled with its video)."""
        segment = self.spec.extra.get("segment")
        return segment["parent"] if segment else self.spec.request_id

    def log(self, message: str, level: str = "INFO") -> None:
        self.log_(self.request_id, message, level)  # type: ignore[operator]

    def cancelled(self) -> bool:
        return self.runner.store.cancel_requested(self.request_id)

    def _decoded(self, frames: Iterator[codec.SourceFrame]) -> Iterator[codec.SourceFrame]:
        """`frames`, timing the decoder's share (the time each next frame takes to come)."""
        while True:
            started = time.perf_counter()
            frame = next(frames, None)
            self.stages.record("decode", time.perf_counter() - started)
            if frame is None:
                return
            yield frame

    def encode_range(
        self,
        start: float,
        end: float | None,
        outputs: dict[str, str],
        *,
        audio: bool,
        segment: bool,
        label: str = "",
    ) -> int:
        """Frames in [start, end) through the network into `outputs` (name -> path); the frame count."""
        runner, params, info = self.runner, self.spec.params, self.info
        assert info is not None
        resolution = runner.overrides.resolution(params.operating_resolution)
        width, height = (int(v) for v in resolution.split("x"))
        background = parse_hex_color(self.options.background_color)[:3]
        batcher = runner.batchers[self.spec.variant]
        writers: dict[str, codec.VideoWriter] = {}
        total = info.frames if end is None else max(1, round((min(end, info.duration) - start) * info.fps))
        done = 0
        last_log = last_cancel = time.monotonic()
        deadline = self.deadline

        def work(frame: codec.SourceFrame) -> tuple[codec.SourceFrame, np.ndarray, np.ndarray]:
            """One frame through the image stages: prepare, the shared batched forward, postprocess,
            cut-out."""
            stages = self.stages
            with stages.stage("prepare"):
                prepared = self.predictor.prepare(frame.rgb, (width, height))
            with stages.stage("forward"):  # includes waiting for the batch to fill
                logits, _ = batcher.infer(
                    prepared, timeout=max(0.0, deadline - time.monotonic()), alone=self.alone
                )
            with stages.stage("postprocess"):
                mask = postprocess(logits, prepared)
            with stages.stage("render"):
                cut, grey = render_frame(
                    frame.rgb,
                    mask,
                    refine=params.refine_foreground,
                    alpha=self.kind.alpha,
                    background=background,
                )
            return frame, cut, grey

        def write(result: tuple[codec.SourceFrame, np.ndarray, np.ndarray]) -> None:
            frame, cut, grey = result
            if not writers:
                for name, path in outputs.items():
                    writers[name] = codec.VideoWriter(
                        path,
                        self.kind,
                        width=frame.rgb.shape[1],
                        height=frame.rgb.shape[0],
                        rate=info.fps,
                        time_base=frame.time_base,
                        quality=self.options.quality,
                        write_mode=self.options.write_mode,
                        grey=name == "mask_video",
                        segment=segment,
                        rotate=frame.rotation,
                        audio_from=self.source if audio and name == "video" and info.has_audio else None,
                    )
            with self.stages.stage("encode"):
                writers["video"].write(cut, frame.pts)
                if "mask_video" in writers:
                    writers["mask_video"].write(grey, frame.pts)

        t = time.perf_counter()
        try:
            pool = ThreadPoolExecutor(
                max_workers=max(1, runner.settings.max_batch_size), thread_name_prefix="frames"
            )
            pending: deque[Future] = deque()
            finished = False
            try:
                for frame in self._decoded(codec.frames(self.source, start, end)):
                    pending.append(pool.submit(work, frame))
                    while len(pending) >= 2 * max(1, runner.settings.max_batch_size) or (
                        pending and pending[0].done()
                    ):
                        write(pending.popleft().result())
                        done += 1
                    now = time.monotonic()
                    if now > deadline:
                        raise JobTimedOut(f"the limit passed at frame {done} of ~{total}{label}")
                    if now - last_cancel >= CANCEL_EVERY:
                        last_cancel = now
                        if self.cancelled():
                            raise Cancelled(f"cancelled after {done} frames{label}")
                    if now - last_log >= PROGRESS_EVERY:
                        last_log = now
                        self.log(f"frames {done}/{total}{label}")
                while pending:
                    try:
                        result = pending[0].result(timeout=CANCEL_EVERY)
                    except FutureTimeout:
                        if self.cancelled():
                            raise Cancelled(f"cancelled after {done} frames{label}") from None
                        continue
                    pending.popleft()
                    write(result)
                    done += 1
                finished = True
            finally:
                # Cancelled or failed: return now; frames already in a forward finish in the background.
                pool.shutdown(wait=finished, cancel_futures=True)
            if done == 0 and not segment:
                raise codec.VideoLoadError("the video has no frames")
            for writer in writers.values():
                writer.close()
        except BaseException:
            for writer in writers.values():
                writer.abort()
            raise
        elapsed = time.perf_counter() - t
        self.timings["frames"] = self.timings.get("frames", 0.0) + elapsed
        self.timings.update({f"frame_{name}": value for name, value in self.stages.seconds.items()})
        self.log(f"frames {done}/{done}{label} ({done / max(elapsed, 1e-9):.1f} frames/s)")
        return done


def run_video_job(
    runner: JobRunner,
    spec: JobSpec,
    token: str,
    deadline: float,
    limit: float,
    predictor: Predictor,
    log_,
    claim: Claim,
) -> Outcome:
    settings = runner.settings
    options = VideoOptions.model_validate(spec.extra["video"])
    run = VideoRun(
        runner,
        spec,
        token,
        predictor,
        log_,
        deadline,
        options,
        codec.OUTPUT_KINDS[options.output_type],
        alone=claim.run_alone,
    )
    segment = spec.extra.get("segment")
    started = time.perf_counter()
    if segment and (run.cancelled() or runner.store.status(segment["parent"]) == "COMPLETED"):
        # The video ended (cancelled, failed or done) before this segment ran: no download, no frames.
        runner.store.complete(spec.request_id, token=token, result={"cancelled": True})
        return Outcome("skipped", "its video has ended")
    if not segment:
        run.log("loading video")
    try:
        data = _fetch(run)
    except ImageTooLargeError as exc:  # the fetcher's own words are about images: a video is too large
        raise codec.VideoTooLargeError(f"the video file is too large: {exc.message}") from None
    except JobError as exc:
        exc.field = "video_url"
        raise
    run.timings["fetch"] = time.perf_counter() - started
    with tempfile.TemporaryDirectory(prefix="birefnet-video-") as tmp:
        run.tmp, run.source = tmp, os.path.join(tmp, "input")
        with open(run.source, "wb") as fh:
            fh.write(data)
        del data
        info = run.info = codec.probe(
            run.source, max_seconds=settings.video_max_seconds, max_pixels=settings.video_max_pixels
        )
        if not segment:
            charge_duration(runner, spec, info.duration)
        # The run-time limit grows with the length this run encodes (the watchdog reads the new deadline).
        seconds = (segment["end"] - segment["start"]) if segment else info.duration
        run.deadline = (
            time.monotonic()
            + limit
            + seconds * settings.video_time_limit_per_second
            - (time.perf_counter() - started)
        )
        runner.extend_deadline(spec.request_id, run.deadline)
        try:
            if segment:
                frames = _run_segment(run)
                completed = runner.store.complete(
                    spec.request_id,
                    token=token,
                    result={"frames": frames},
                    extra={"timings": run.timings},
                    report=runner.report("done", run.timings.get("total")),
                )
                runner.ended(spec.request_id, completed)
                return Outcome("done", timings=run.timings)
            run.log(
                f"video {info.width}x{info.height}, {info.duration:.2f}s, ~{info.frames} frames at "
                f"{info.fps:.3g} fps{', with audio' if info.has_audio else ''}"
            )
            resolution = runner.overrides.resolution(spec.params.operating_resolution)
            run.log(f"inference {resolution} on {predictor.device}, {options.output_type}")
            outputs = {"video": os.path.join(tmp, "video" + run.kind.extension)}
            if spec.params.output_mask:
                outputs["mask_video"] = os.path.join(tmp, "mask" + run.kind.extension)
            count = segment_count(info.duration, settings.video_segment_seconds, run.kind)
            if count > 1:
                frames = _run_segmented(run, count, outputs)
            else:
                frames = run.encode_range(0.0, None, outputs, audio=True, segment=False)
        except Cancelled as exc:
            run.log(str(exc))
            if not segment:
                runner._end(spec, token, RequestCancelled())
            else:
                completed = runner.store.complete(
                    spec.request_id,
                    token=token,
                    result={"cancelled": True},
                    report=runner.report("cancelled"),
                )
                runner.ended(spec.request_id, completed)
            return Outcome("cancelled")
        if runner._cancelled(spec, token):
            return Outcome("cancelled")
        run.log("uploading" if not spec.params.sync_mode else "encoding data URIs")
        t = time.perf_counter()
        body: dict[str, object] = {
            name: publish(
                runner, spec, path, run.kind, info, frames, stem="video" if name == "video" else "mask"
            )
            for name, path in outputs.items()
        }
        body.setdefault("mask_video", None)
        run.timings["upload"] = time.perf_counter() - t
    run.timings["total"] = time.perf_counter() - started
    runner._finish(
        spec,
        token,
        body=body,
        inference_time=run.timings.get("frames"),
        extra={"timings": run.timings, "weights": predictor.weights_description, "frames": frames},
    )
    run.log(f"done in {run.timings['total']:.2f}s")
    return Outcome("done", timings=run.timings)


def charge_duration(runner: JobRunner, spec: JobSpec, duration: float) -> None:
    """Charge the video's duration against its API key's budgets before any frame runs, beyond the units it
    was admitted with (one, unless the gateway read the duration of an inline video); LimitRefused ends it
    with fal's 429 body. Its segments ride on this."""
    budgets = spec.extra.get("limits")
    if not budgets or not spec.owner:
        return
    units = max(video_units(duration, runner.settings.video_limit_unit_seconds), admitted_units(spec.extra))
    refusal = Limiter(runner.limits, runner.settings).charge(
        key_id=spec.owner,
        request_id=spec.request_id,
        units=units,
        held=admitted_units(spec.extra),
        max_concurrent=budgets.get("max_concurrent"),
        requests_per_minute=budgets.get("requests_per_minute"),
    )
    if refusal is not None:
        raise refusal
    runner.store.log(spec.request_id, f"counted as {units} units against the key's limits")


def _fetch(run: VideoRun) -> bytes:
    from common.adapters.fetch import fetch_input

    runner, spec = run.runner, run.spec
    return fetch_input(
        spec.image_url,
        objects=runner.objects,
        max_bytes=runner.settings.video_max_bytes,
        policy=runner.net_policy,
        version_id=spec.input_version,
        if_match=spec.input_etag,
        timeout=runner.settings.http_timeout,
    )


def segment_count(duration: float, segment_seconds: float, kind: codec.OutputKind) -> int:
    """How many segments a video is split into (GIFs, short videos and a 0 setting: one)."""
    if segment_seconds <= 0 or kind.codec == "gif" or duration <= segment_seconds * 1.5:
        return 1
    return math.ceil(duration / segment_seconds)


def segment_keys(spec: JobSpec, index: int, kind: codec.OutputKind) -> dict[str, str]:
    base = f"{spec.output_prefix}segments/{index:04d}"
    names = {"video": f"{base}-video{kind.extension}"}
    if spec.params.output_mask:
        names["mask_video"] = f"{base}-mask{kind.extension}"
    return names


def segment_specs(spec: JobSpec, count: int, duration: float) -> list[JobSpec]:
    """One job per segment, [start, end) seconds; ids derive from the video's, so a rerun finds them."""
    step = duration / count
    specs = []
    for i in range(count):
        start, end = i * step, (duration + 1.0 if i == count - 1 else (i + 1) * step)
        segment = {"parent": spec.request_id, "index": i, "count": count, "start": start, "end": end}
        specs.append(
            spec.model_copy(
                update={
                    "request_id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{spec.request_id}/segment/{i}")),
                    "webhook_url": None,
                    "start_deadline": None,
                    "input_fingerprint": None,
                    "extra": {**spec.extra, "segment": segment},
                }
            )
        )
    return specs


def _run_segment(run: VideoRun) -> int:
    """A segment job: encode its frames (no audio) and store the parts."""
    segment = run.spec.extra["segment"]
    label = f" of segment {segment['index'] + 1}/{segment['count']}"
    outputs = {
        name: os.path.join(run.tmp, f"part-{name}{run.kind.extension}")
        for name in segment_keys(run.spec, segment["index"], run.kind)
    }
    frames = run.encode_range(
        segment["start"], segment["end"], outputs, audio=False, segment=True, label=label
    )
    settings = run.runner.settings
    for name, key in segment_keys(run.spec, segment["index"], run.kind).items():
        if os.path.exists(outputs[name]):
            with open(outputs[name], "rb") as fh:
                run.runner.objects.write(
                    settings.output_bucket,
                    key,
                    fh.read(),
                    run.kind.content_type,
                    metadata={"request-id": segment["parent"]},
                )
    return frames


def _run_segmented(run: VideoRun, count: int, outputs: dict[str, str]) -> int:
    """The video's own job: queue the segments, take those nobody holds, wait for the rest, join."""
    runner, spec, settings = run.runner, run.spec, run.runner.settings
    assert run.info is not None
    children = segment_specs(spec, count, run.info.duration)
    for child in children:
        if runner.store.create(child):
            send_job(runner.celery, child)
    run.log(f"split into {count} segments of ~{run.info.duration / count:.1f}s, queued for any worker")
    remaining = {child.request_id: child for child in children}
    counts: dict[str, int] = {}  # segment request id -> the frames its run recorded
    max_attempts = min(spec.max_attempts or settings.max_job_attempts, settings.max_job_attempts)
    while remaining:
        if run.cancelled():
            raise Cancelled(f"cancelled with {count - len(remaining)}/{count} segments done")
        progressed = False
        for rid, child in list(remaining.items()):
            token = uuid.uuid4().hex
            claim = runner.store.claim(
                rid,
                child.variant,
                token,
                lease_seconds=settings.job_lease_seconds,
                max_attempts=max_attempts,
                worker=runner.worker_name,
            )
            if claim.outcome == "missing":
                runner.store.create(child)
                continue
            if claim.outcome == "exhausted":
                raise JobError(
                    f"segment {child.extra['segment']['index'] + 1}/{count} failed {max_attempts} times",
                    error_type="runner_disconnected",
                    status_code=503,
                )
            if claim.outcome == "claimed":
                sub = replace(run, spec=child, token=token, alone=claim.run_alone, stages=StageTimings())
                with LeaseKeeper(
                    runner.store, rid, child.variant, token, settings.job_lease_seconds, runner.health
                ):
                    n = _run_segment(sub)
                runner.store.complete(rid, token=token, result={"frames": n})
            if claim.outcome in ("claimed", "completed"):
                record = runner.store.get(rid)
                result = (record.result if record is not None else None) or {}
                if result.get("cancelled"):
                    raise Cancelled("cancelled")
                counts[rid] = int(result.get("frames", 0))
                del remaining[rid]
                run.log(
                    f"segment {child.extra['segment']['index'] + 1}/{count} done "
                    f"({count - len(remaining)}/{count} segments)"
                )
                progressed = True
                break  # look again from the first: the earliest free segment first
        if remaining and not progressed:
            if time.monotonic() > run.deadline:
                raise JobTimedOut("the limit passed while waiting for segments")
            time.sleep(WAIT_POLL)
    if not any(counts.values()):
        raise codec.VideoLoadError("the video has no frames")
    for child in children:
        # A segment with frames stored its parts; should this worker not find them (stored by a worker whose
        # output bucket is another, or removed since), it encodes the segment again: a join without them
        # would lack the segment's frames.
        index = child.extra["segment"]["index"]
        keys = segment_keys(child, index, run.kind).values()
        if not counts[child.request_id] or all(
            runner.objects.exists(settings.output_bucket, key) for key in keys
        ):
            continue
        run.log(
            f"segment {index + 1}/{count}: its parts are not in the output bucket; encoding it again", "WARN"
        )
        counts[child.request_id] = _run_segment(replace(run, spec=child, stages=StageTimings()))
    frames = sum(counts.values())
    t = time.perf_counter()
    for name, path in outputs.items():
        parts = []
        for child in children:
            if not counts[child.request_id]:
                continue  # a segment without frames stores no parts
            key = segment_keys(child, child.extra["segment"]["index"], run.kind)[name]
            part = os.path.join(run.tmp, os.path.basename(key))
            with open(part, "wb") as fh:
                fh.write(
                    runner.objects.read(settings.output_bucket, key, max_bytes=8 * settings.video_max_bytes)
                )
            parts.append(part)
        codec.join_segments(
            parts, path, run.kind, run.source if name == "video" and run.info.has_audio else None
        )
        for part in parts:
            os.remove(part)
    run.timings["join"] = time.perf_counter() - t
    run.log(f"joined {count} segments")
    return frames


def publish(
    runner: JobRunner,
    spec: JobSpec,
    path: str,
    kind: codec.OutputKind,
    info: codec.VideoInfo,
    frames: int,
    *,
    stem: str,
) -> dict:
    file_name = f"{stem}{kind.extension}"
    with open(path, "rb") as fh:
        data = fh.read()
    if spec.params.sync_mode:
        url = f"data:{kind.content_type};base64,{base64.b64encode(data).decode()}"
    else:
        key = spec.output_prefix + file_name
        runner.objects.write(
            runner.settings.output_bucket,
            key,
            data,
            kind.content_type,
            metadata={"request-id": spec.request_id},
        )
        url = runner.objects.url_for(
            runner.settings.output_bucket, key, ttl=spec.extra.get("output_ttl"), api=spec.source == "api"
        )
    width = info.width if kind.codec == "gif" else info.width - info.width % 2
    height = info.height if kind.codec == "gif" else info.height - info.height % 2
    return VideoFile(
        url=url,
        content_type=kind.content_type,
        file_name=file_name,
        file_size=len(data),
        width=width,
        height=height,
        fps=round(info.fps, 3),
        duration=round(info.duration, 3),
        num_frames=frames,
    ).model_dump()
