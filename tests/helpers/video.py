"""Video files for the video tests: generated clips (devstack/clips.py), an audio-only file, and what a user
checks in a result."""

from __future__ import annotations

import av
import numpy as np

from devstack.clips import make_clip

__all__ = ["make_audio_only", "make_clip", "read_video"]


def make_audio_only(path: str, seconds: float = 1.0) -> str:
    with av.open(path, mode="w", format="mp4") as out:
        a_stream = out.add_stream("aac", rate=16000)
        n = int(16000 * seconds)
        tone = np.zeros((1, n), np.float32)
        for start in range(0, n, 1024):
            frame = av.AudioFrame.from_ndarray(
                tone[:, start : start + 1024].copy(), format="fltp", layout="mono"
            )
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
        info = {
            "audio": bool(container.streams.audio),
            "codec": v.codec_context.name,
            "width": v.codec_context.width,
            "height": v.codec_context.height,
            "times": [],
            "alpha": None,
            "rotation": None,
        }
        decoded = (
            container.decode(v)
            if decoder is None
            else (f for p in container.demux(v) for f in decoder.decode(p))
        )
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
    with (
        av.open(source) as src,
        av.open(path + ".fs.mp4", "w", format="mp4", options={"movflags": "faststart"}) as dst,
    ):
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
