"""One video job on a worker: fetch to a temporary file, probe, stream frames through the batcher (the
image path's per-frame stages: prepare, batched forward, mask resize, refinement), encode the outputs,
store them. Frames of one job run in parallel threads so that they share forwards (up to
max_batch_size a forward); the main thread writes them in order, so at most a window of frames is held."""

from __future__ import annotations

import base64
import os
import tempfile
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

from common.adapters.fetch import fetch_input
from common.domain.errors import JobError
from common.domain.extensions import parse_hex_color
from common.domain.schemas import JobSpec
from common.domain.video import VideoFile, VideoOptions
from worker import pixels
from worker.video import codec

if TYPE_CHECKING:
    from worker.engine import Predictor
    from worker.runner import JobRunner, Outcome

PROGRESS_EVERY = 2.0  # seconds between progress log lines
CANCEL_EVERY = 0.5  # seconds between cancellation checks


def render_frame(rgb: np.ndarray, mask: np.ndarray, *, refine: bool, alpha: bool,
                 background: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(cutout pixels, grey mask): RGBA where the output keeps alpha, else laid on `background`."""
    alpha8 = pixels.mask_to_uint8(mask)
    fg = pixels.refine_colours(rgb, mask, alpha8) if refine else rgb
    if alpha:
        return pixels.rgba_array(fg, alpha8), alpha8
    a = alpha8[..., None].astype(np.float32) / 255.0
    if not refine:  # unrefined colours still carry the old background at soft edges: weight them
        fg = rgb
    out = fg.astype(np.float32) * a + np.asarray(background, np.float32) * (1.0 - a)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8), alpha8


def run_video_job(runner: JobRunner, spec: JobSpec, token: str, deadline: float, limit: float,
                  predictor: Predictor, log_) -> Outcome:
    from worker.runner import JobTimedOut, Outcome  # the runner imports this module lazily

    settings, rid, params = runner.settings, spec.request_id, spec.params
    options = VideoOptions.model_validate(spec.extra["video"])
    kind = codec.OUTPUT_KINDS[options.output_type]
    timings: dict[str, float] = {}
    started = time.perf_counter()
    log_(rid, "loading video")
    try:
        data = fetch_input(spec.image_url, objects=runner.objects, max_bytes=settings.video_max_bytes,
                           policy=runner.net_policy, version_id=spec.input_version, if_match=spec.input_etag,
                           timeout=settings.http_timeout)
    except JobError as exc:
        exc.field = "video_url"
        raise
    timings["fetch"] = time.perf_counter() - started
    with tempfile.TemporaryDirectory(prefix="birefnet-video-") as tmp:
        source = os.path.join(tmp, "input")
        with open(source, "wb") as fh:
            fh.write(data)
        del data
        info = codec.probe(source, max_seconds=settings.video_max_seconds, max_pixels=settings.video_max_pixels)
        # The run-time limit grows with the video's length (the watchdog reads the new deadline).
        limit = limit + info.duration * settings.video_time_limit_per_second
        deadline = time.monotonic() + limit - (time.perf_counter() - started)
        runner.extend_deadline(rid, deadline)
        log_(rid, f"video {info.width}x{info.height}, {info.duration:.2f}s, ~{info.frames} frames at "
                  f"{info.fps:.3g} fps{', with audio' if info.has_audio else ''}")
        resolution = runner.hooks.operating_resolution or params.operating_resolution
        size = tuple(int(v) for v in resolution.split("x"))
        log_(rid, f"inference {resolution} on {predictor.device}, {options.output_type}")
        background = parse_hex_color(options.background_color)[:3]
        rotate = 0
        outputs = {"video": os.path.join(tmp, "video" + kind.extension)}
        if params.output_mask:
            outputs["mask_video"] = os.path.join(tmp, "mask" + kind.extension)
        writers: dict[str, codec.VideoWriter] = {}
        batcher = runner.batchers[spec.variant]
        alone = runner.store.runs_alone(rid)
        done = 0
        last_log = last_cancel = time.monotonic()
        t_infer = 0.0

        def work(frame: codec.SourceFrame) -> tuple[codec.SourceFrame, np.ndarray, np.ndarray]:
            mask, _ = batcher.predict(frame.rgb, size, timeout=max(0.0, deadline - time.monotonic()),  # type: ignore[arg-type]
                                      alone=alone)
            cut, grey = render_frame(frame.rgb, mask, refine=params.refine_foreground, alpha=kind.alpha,
                                     background=background)
            return frame, cut, grey

        def write(result: tuple[codec.SourceFrame, np.ndarray, np.ndarray]) -> None:
            frame, cut, grey = result
            if not writers:
                for name, path in outputs.items():
                    writers[name] = codec.VideoWriter(
                        path, kind, width=frame.rgb.shape[1], height=frame.rgb.shape[0], rate=info.fps,
                        time_base=frame.time_base, quality=options.quality, write_mode=options.write_mode,
                        grey=name == "mask_video", rotate=rotate,
                        audio_from=source if name == "video" and info.has_audio else None)
            writers["video"].write(cut, frame.pts)
            if "mask_video" in writers:
                writers["mask_video"].write(grey, frame.pts)

        window = max(2, 2 * settings.max_batch_size)
        t = time.perf_counter()
        try:
            with ThreadPoolExecutor(max_workers=max(1, settings.max_batch_size),
                                    thread_name_prefix=f"frames-{rid[:8]}") as pool:
                pending: deque[Future] = deque()
                for frame in codec.frames(source):
                    pending.append(pool.submit(work, frame))
                    while len(pending) >= window or (pending and pending[0].done()):
                        write(pending.popleft().result())
                        done += 1
                    now = time.monotonic()
                    if now > deadline:
                        raise JobTimedOut(f"the limit passed at frame {done} of ~{info.frames}")
                    if now - last_cancel >= CANCEL_EVERY:
                        last_cancel = now
                        if runner._cancelled(spec, token):
                            for f in pending:
                                f.cancel()
                            log_(rid, f"cancelled after {done} frames")
                            return Outcome("cancelled")
                    if now - last_log >= PROGRESS_EVERY:
                        last_log = now
                        log_(rid, f"frames {done}/{info.frames}")
                while pending:
                    write(pending.popleft().result())
                    done += 1
            t_infer = time.perf_counter() - t
            if done == 0:
                raise codec.VideoLoadError("the video has no frames")
            t = time.perf_counter()
            for writer in writers.values():
                writer.close()
            timings["encode_close"] = time.perf_counter() - t
        except BaseException:
            for writer in writers.values():
                writer.abort()
            raise
        timings["frames"] = t_infer
        log_(rid, f"frames {done}/{done} ({done / max(t_infer, 1e-9):.1f} frames/s)")
        if runner._cancelled(spec, token):
            return Outcome("cancelled")
        log_(rid, "uploading" if not params.sync_mode else "encoding data URIs")
        t = time.perf_counter()
        body: dict[str, object] = {
            name: publish(runner, spec, path, kind, info, done, stem="video" if name == "video" else "mask")
            for name, path in outputs.items()}
        body.setdefault("mask_video", None)
        timings["upload"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - started
    runner._finish(spec, token, body=body, inference_time=t_infer,
                   extra={"timings": timings, "weights": predictor.weights_description, "frames": done})
    log_(rid, f"done in {timings['total']:.2f}s")
    return Outcome("done", timings=timings)


def publish(runner: JobRunner, spec: JobSpec, path: str, kind: codec.OutputKind, info: codec.VideoInfo,
            frames: int, *, stem: str) -> dict:
    file_name = f"{stem}{kind.extension}"
    with open(path, "rb") as fh:
        data = fh.read()
    if spec.params.sync_mode:
        url = f"data:{kind.content_type};base64,{base64.b64encode(data).decode()}"
    else:
        key = spec.output_prefix + file_name
        runner.objects.write(runner.settings.output_bucket, key, data, kind.content_type,
                             metadata={"request-id": spec.request_id})
        url = runner.objects.url_for(runner.settings.output_bucket, key, ttl=spec.extra.get("output_ttl"),
                                     api=spec.source == "api")
    width = info.width if kind.codec == "gif" else info.width - info.width % 2
    height = info.height if kind.codec == "gif" else info.height - info.height % 2
    return VideoFile(url=url, content_type=kind.content_type, file_name=file_name, file_size=len(data),
                     width=width, height=height, fps=round(info.fps, 3), duration=round(info.duration, 3),
                     num_frames=frames).model_dump()
