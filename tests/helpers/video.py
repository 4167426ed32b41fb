"""Short generated clips for the video tests: a moving square on a gradient, and a sine audio track."""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np


def make_clip(path: str, *, width: int = 96, height: int = 64, seconds: float = 1.0, fps: int = 12,
              audio: bool = True, container: str = "mp4", codec: str = "libx264",
              frame_pts: list[int] | None = None, rotate: int = 0) -> str:
    """Writes a clip to `path`. `frame_pts`: explicit timestamps in 1/1000 s (variable frame rate)."""
    frames = int(seconds * fps) if frame_pts is None else len(frame_pts)
    with av.open(path, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if frame_pts is not None:
            stream.time_base = stream.codec_context.time_base = Fraction(1, 1000)
        if rotate:
            stream.set_display_rotation(rotate)
        a_stream = out.add_stream("aac", rate=16000) if audio else None
        ys, xs = np.mgrid[0:height, 0:width]
        for i in range(frames):
            rgb = np.zeros((height, width, 3), np.uint8)
            rgb[..., 0] = (xs * 255 // max(1, width - 1)).astype(np.uint8)
            rgb[..., 2] = (ys * 255 // max(1, height - 1)).astype(np.uint8)
            x0 = (i * 4) % max(1, width - height // 2)
            rgb[height // 4: height // 4 + height // 2, x0: x0 + height // 2] = (250, 250, 40)
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
                chunk = tone[start:start + 1024].reshape(1, -1)
                frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="mono")
                frame.sample_rate, frame.pts = rate, start
                for packet in a_stream.encode(frame):
                    out.mux(packet)
            for packet in a_stream.encode():
                out.mux(packet)
    return path


def make_audio_only(path: str, seconds: float = 1.0) -> str:
    with av.open(path, mode="w", format="mp4") as out:
        a_stream = out.add_stream("aac", rate=16000)
        n = int(16000 * seconds)
        tone = np.zeros((1, n), np.float32)
        for start in range(0, n, 1024):
            frame = av.AudioFrame.from_ndarray(tone[:, start:start + 1024].copy(), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, start
            for packet in a_stream.encode(frame):
                out.mux(packet)
        for packet in a_stream.encode():
            out.mux(packet)
    return path


def read_video(path: str) -> dict:
    """What a user checks: streams, frame count, size, timestamps (s), and the first frame's alpha."""
    with av.open(path) as container:
        v = container.streams.video[0]
        if v.codec_context.name == "vp9":  # FFmpeg's own VP9 decoder drops the alpha plane; libvpx reads it
            v.codec_context  # noqa: B018
            decoder = av.CodecContext.create("libvpx-vp9", "r")
        else:
            decoder = None
        info = {"audio": bool(container.streams.audio), "codec": v.codec_context.name,
                "width": v.codec_context.width, "height": v.codec_context.height, "times": [], "alpha": None,
                "rotation": None}
        decoded = container.decode(v) if decoder is None else (
            f for p in container.demux(v) for f in decoder.decode(p))
        for frame in decoded:
            if frame.pts is None:
                continue
            info["times"].append(round(float(frame.pts * (frame.time_base or v.time_base)), 3))
            if info["rotation"] is None:
                info["rotation"] = int(frame.rotation or 0) % 360
            if info["alpha"] is None and frame.format.name.startswith(("yuva", "rgba", "argb", "bgra")):
                info["alpha"] = frame.to_ndarray(format="rgba")[..., 3]
        info["frames"] = len(info["times"])
    return info


def make_frameless(path: str) -> str:
    """An MP4 whose index lists a 1 s H.264 stream but whose sample data is gone: it opens and probes as a
    video, and decodes to no frames."""
    source = make_clip(path + ".src.mp4", audio=False)
    with av.open(source) as src, av.open(path + ".fs.mp4", "w", format="mp4",
                                         options={"movflags": "faststart"}) as dst:
        stream = dst.add_stream_from_template(src.streams.video[0])
        for packet in src.demux(src.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                dst.mux(packet)
    with open(path + ".fs.mp4", "rb") as fh:
        data = fh.read()
    with open(path, "wb") as fh:  # the index (moov, first with faststart), then an empty mdat header
        fh.write(data[: data.index(b"mdat") + 4])
    return path
