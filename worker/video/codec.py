"""Decoding and encoding with PyAV (FFmpeg in its wheels). Frames are streamed: at most a window of
frames is held at once, so memory stays flat with duration. Timestamps are copied from the input (frame
rate and variable frame rate kept), the audio track is copied (re-encoded only where the container
cannot hold its codec), and the rotation is written back as the stream's display matrix."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import cast

import av
import numpy as np
from av.video.stream import VideoStream
from PIL import Image

from common.domain.errors import JobError

log = logging.getLogger(__name__)


class VideoLoadError(JobError):
    error_type = "video_load_error"
    field = "video_url"


class VideoTooLargeError(JobError):
    error_type = "video_too_large"
    field = "video_url"


@dataclass(frozen=True)
class VideoInfo:
    width: int
    height: int
    duration: float  # seconds
    frames: int  # the container's count, else duration x average rate (an estimate for progress)
    fps: float
    has_audio: bool
    codec: str


@dataclass(frozen=True)
class OutputKind:
    """One output type: container, codec, pixel format, whether alpha is kept, content type."""

    extension: str
    container: str
    codec: str
    pix_fmt: str
    alpha: bool
    content_type: str


OUTPUT_KINDS = {
    "X264 (.mp4)": OutputKind(".mp4", "mp4", "libx264", "yuv420p", False, "video/mp4"),
    "VP9 (.webm)": OutputKind(".webm", "webm", "libvpx-vp9", "yuva420p", True, "video/webm"),
    "PRORES4444 (.mov)": OutputKind(".mov", "mov", "prores_ks", "yuva444p10le", True, "video/quicktime"),
    "GIF (.gif)": OutputKind(".gif", "gif", "gif", "pal8", False, "image/gif"),
}
# Audio codecs each container takes as they are; others are re-encoded to the first listed.
AUDIO_COPY = {
    "mp4": ("aac", "mp3", "alac", "opus"),
    "mov": ("aac", "pcm_s16le", "alac", "mp3"),
    "webm": ("opus", "vorbis"),
}
# video_quality -> CRF (x264, VP9) or ProRes qscale (lower is better); video_write_mode -> encoder speed.
_CRF = {"low": (28, 40, 11), "medium": (23, 34, 8), "high": (18, 28, 5), "maximum": (12, 15, 2)}
_SPEED = {
    "fast": ("veryfast", "8", "realtime"),
    "balanced": ("medium", "4", "good"),
    "small": ("slow", "1", "good"),
}


def probe(path: str, *, max_seconds: float, max_pixels: int) -> VideoInfo:
    """The video's facts, or a clear error: not a video, audio only, too long, too large."""
    try:
        with av.open(path, metadata_errors="ignore") as container:
            videos = container.streams.video
            if not videos:
                if container.streams.audio:
                    raise VideoLoadError("the file has an audio track but no video stream")
                raise VideoLoadError("the file holds no video stream")
            stream = videos[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            if not width or not height:
                raise VideoLoadError("the video stream has no frame size (corrupt or unsupported)")
            duration = _duration(container, stream)
            rate = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
            frames = stream.frames or max(1, round(duration * rate))
            info = VideoInfo(
                width,
                height,
                duration,
                frames,
                rate,
                bool(container.streams.audio),
                stream.codec_context.name,
            )
    except av.FFmpegError as exc:
        raise VideoLoadError(f"cannot read the file as a video: {exc}") from None
    if duration > max_seconds:
        raise VideoTooLargeError(f"the video is {duration:.1f}s long; the limit is {max_seconds:.0f}s")
    if width * height > max_pixels:
        raise VideoTooLargeError(f"the video's frames are {width}x{height}; the limit is {max_pixels} pixels")
    return info


def _duration(container, stream) -> float:
    if stream.duration is not None and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return 0.0


@dataclass
class SourceFrame:
    rgb: np.ndarray  # (H, W, 3) uint8, as stored (not rotated: the output carries the rotation instead)
    pts: int | None
    time_base: Fraction | None
    rotation: int = 0  # degrees counter-clockwise, from the stream's display matrix


def frames(path: str, start: float = 0.0, end: float | None = None) -> Iterator[SourceFrame]:
    """The decoded frames whose time lies in [start, end) (seconds), in order. A stream that breaks
    mid-way raises VideoLoadError."""
    try:
        with av.open(path, metadata_errors="ignore") as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            tb = stream.time_base
            if start > 0 and tb:
                container.seek(int(start / tb), stream=stream, backward=True, any_frame=False)
            for frame in container.decode(stream):
                t = float(frame.pts * tb) if frame.pts is not None and tb else None
                if t is not None and t < start - 1e-6:
                    continue
                if end is not None and t is not None and t >= end - 1e-6:
                    break
                yield SourceFrame(frame.to_ndarray(format="rgb24"), frame.pts, tb, int(frame.rotation or 0))
    except av.FFmpegError as exc:
        raise VideoLoadError(f"the video stream is corrupt: {exc}") from None


class VideoWriter:
    """Writes frames with their source timestamps into one output file (and the source's audio)."""

    def __init__(
        self,
        path: str,
        kind: OutputKind,
        *,
        width: int,
        height: int,
        rate: float,
        time_base: Fraction | None,
        quality: str,
        write_mode: str,
        grey: bool = False,
        rotate: int = 0,
        segment: bool = False,
        audio_from: str | None = None,
        audio_window: tuple[float, float | None] = (0.0, None),
    ):
        self.kind, self.grey = kind, grey
        self.container = av.open(path, mode="w", format=kind.container)
        self.width, self.height = width - width % 2, height - height % 2  # 4:2:0 wants even sizes
        if kind.codec == "gif":
            self.width, self.height = width, height
        stream = cast(
            VideoStream, self.container.add_stream(kind.codec, rate=Fraction(rate).limit_denominator(1001))
        )
        stream.width, stream.height = self.width, self.height
        pix_fmt = kind.pix_fmt
        if grey and kind.alpha:
            pix_fmt = pix_fmt.replace("yuva", "yuv")
        stream.pix_fmt = pix_fmt
        self.time_base = time_base or Fraction(1, max(1, round(rate)))
        if kind.codec != "gif":
            stream.time_base = self.time_base
            stream.codec_context.time_base = self.time_base
        x264_crf, vp9_crf, prores_q = _CRF.get(quality, _CRF["high"])
        preset, cpu_used, deadline = _SPEED.get(write_mode, _SPEED["balanced"])
        if kind.codec == "libx264":
            stream.options = {"crf": str(x264_crf), "preset": preset}
            if segment:  # no B-frames: decode order = display order, so segments join by remuxing
                stream.options["bframes"] = "0"
        elif kind.codec == "libvpx-vp9":
            stream.options = {
                "crf": str(vp9_crf),
                "b": "0",
                "cpu-used": cpu_used,
                "deadline": deadline,
                "row-mt": "1",
            }
        elif kind.codec == "prores_ks":
            stream.options = {"profile": "4444", "qscale": str(prores_q), "vendor": "apl0"}
        if rotate:
            stream.set_display_rotation(rotate)  # the source's display matrix: players rotate as they did
        self.stream = stream
        self.frames = 0
        self._last_pts: int | None = None
        # The audio stream must exist before the first packet is written; its packets go in at close.
        self._audio = None
        if audio_from and kind.container in AUDIO_COPY:
            self._audio = AudioCopy(audio_from, self.container, AUDIO_COPY[kind.container], *audio_window)

    def write(self, pixels: np.ndarray, pts: int | None) -> None:
        """`pixels`: (H, W, 4) RGBA (alpha kinds), (H, W, 3) RGB, or (H, W) grey."""
        if pixels.shape[0] != self.height or pixels.shape[1] != self.width:
            pixels = pixels[: self.height, : self.width]
        if self.kind.codec == "gif":
            frame = _palette_frame(pixels)
        else:
            fmt = "gray" if pixels.ndim == 2 else "rgba" if pixels.shape[2] == 4 else "rgb24"
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format=fmt)
        if self.kind.codec != "gif" and pts is not None:
            if self._last_pts is not None and pts <= self._last_pts:
                pts = self._last_pts + 1  # a muxer refuses equal or decreasing timestamps
            frame.pts, frame.time_base = pts, self.time_base
            self._last_pts = pts
        for packet in self.stream.encode(frame.reformat(format=self.stream.pix_fmt)):
            self.container.mux(packet)
        self.frames += 1

    def close(self) -> None:
        for packet in self.stream.encode():
            self.container.mux(packet)
        if self._audio is not None:
            self._audio.write()
        self.container.close()

    def abort(self) -> None:
        if self._audio is not None:
            self._audio.src.close()
        with contextlib.suppress(av.FFmpegError):
            self.container.close()


def _palette_frame(pixels: np.ndarray) -> av.VideoFrame:
    """A pal8 frame with its own 256-colour palette (FFmpeg's converter has no palette quantiser)."""
    image = Image.fromarray(pixels if pixels.ndim == 2 else pixels[..., :3]).convert("RGB")
    quantised = image.quantize(256, method=Image.Quantize.MEDIANCUT)
    rgb = np.zeros((256, 3), np.uint8)
    used = np.frombuffer(bytes(quantised.getpalette() or []), np.uint8).reshape(-1, 3)[:256]
    rgb[: len(used)] = used
    argb = np.concatenate([np.full((256, 1), 255, np.uint8), rgb], axis=1)
    return av.VideoFrame.from_ndarray((np.asarray(quantised, dtype=np.uint8), argb), format="pal8")  # type: ignore[arg-type]


class AudioCopy:
    """The source's first audio track into `out`, copied when the container takes its codec, else
    re-encoded to the container's first audio codec; only packets in [start, end) seconds."""

    def __init__(
        self, source: str, out, allowed: tuple[str, ...], start: float = 0.0, end: float | None = None
    ):
        self.src = av.open(source, metadata_errors="ignore")
        self.out, self.start, self.end = out, start, end
        self.a_in = self.src.streams.audio[0] if self.src.streams.audio else None
        self.a_out = None
        if self.a_in is None:
            return
        self.copy = self.a_in.codec_context.name in allowed
        if self.copy:
            self.a_out = out.add_stream_from_template(self.a_in)
        else:
            self.a_out = out.add_stream(allowed[0], rate=self.a_in.codec_context.sample_rate or 48000)

    def write(self) -> None:
        try:
            if self.a_in is None or self.a_out is None:
                return
            tb = self.a_in.time_base
            if self.start > 0 and tb:
                self.src.seek(int(self.start / tb), stream=self.a_in, backward=True)
            for packet in self.src.demux(self.a_in):
                if packet.dts is None:
                    continue
                t = float(packet.pts * tb) if packet.pts is not None and tb else 0.0
                if t < self.start - 1e-6:
                    continue
                if self.end is not None and t >= self.end - 1e-6:
                    break
                if self.copy:
                    packet.stream = self.a_out
                    self.out.mux(packet)
                    continue
                for frame in packet.decode():
                    frame.pts = None
                    for encoded in self.a_out.encode(frame):
                        self.out.mux(encoded)
            if not self.copy:
                for encoded in self.a_out.encode():
                    self.out.mux(encoded)
        finally:
            self.src.close()


def join_segments(parts: list[str], out_path: str, kind: OutputKind, audio_from: str | None) -> None:
    """Segment files (each holding its frames with the source's own timestamps) remuxed in order into one
    file, without re-encoding, and the source's audio track added."""
    with av.open(parts[0]) as first:
        out = av.open(out_path, mode="w", format=kind.container)
        v_out = out.add_stream_from_template(first.streams.video[0])
    audio = (
        AudioCopy(audio_from, out, AUDIO_COPY[kind.container])
        if audio_from and kind.container in AUDIO_COPY
        else None
    )
    try:
        for part in parts:
            with av.open(part) as src:
                for packet in src.demux(src.streams.video[0]):
                    if packet.dts is None:
                        continue
                    packet.stream = v_out
                    out.mux(packet)
        if audio is not None:
            audio.write()
    finally:
        out.close()
