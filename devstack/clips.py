"""Short generated clips for the video benchmarks and tests: a moving square on a gradient, and a sine audio
track."""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
from av.audio.stream import AudioStream
from av.video.stream import VideoStream


def make_clip(
    path: str,
    *,
    width: int = 96,
    height: int = 64,
    seconds: float = 1.0,
    fps: int = 12,
    audio: bool = True,
    container: str = "mp4",
    codec: str = "libx264",
    frame_pts: list[int] | None = None,
    rotate: int = 0,
) -> str:
    """Writes a clip to `path`. `frame_pts`: explicit timestamps in 1/1000 s (variable frame rate)."""
    frames = int(seconds * fps) if frame_pts is None else len(frame_pts)
    with av.open(path, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=fps)
        assert isinstance(stream, VideoStream)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if frame_pts is not None:
            stream.time_base = stream.codec_context.time_base = Fraction(1, 1000)
        if rotate:
            stream.set_display_rotation(rotate)
        a_stream = out.add_stream("aac", rate=16000) if audio else None
        assert a_stream is None or isinstance(a_stream, AudioStream)
        ys, xs = np.mgrid[0:height, 0:width]
        for i in range(frames):
            rgb = np.zeros((height, width, 3), np.uint8)
            rgb[..., 0] = (xs * 255 // max(1, width - 1)).astype(np.uint8)
            rgb[..., 2] = (ys * 255 // max(1, height - 1)).astype(np.uint8)
            x0 = (i * 4) % max(1, width - height // 2)
            rgb[height // 4 : height // 4 + height // 2, x0 : x0 + height // 2] = (250, 250, 40)
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            if frame_pts is not None:
                frame.pts, frame.time_base = frame_pts[i], Fraction(1, 1000)
            else:
                frame.pts = i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
        if a_stream is not None:
            rate, n = 16000, int(16000 * seconds)
            tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(n) / rate)).astype(np.float32)
            for start in range(0, n, 1024):
                chunk = tone[start : start + 1024].reshape(1, -1)
                sound = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="mono")
                sound.sample_rate, sound.pts = rate, start
                for packet in a_stream.encode(sound):
                    out.mux(packet)
            for packet in a_stream.encode():
                out.mux(packet)
    return path
