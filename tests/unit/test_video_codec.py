"""The video codec layer on its own (PyAV): probing errors, outputs per type, and joining segments."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers.video import make_audio_only, make_clip, read_video
from worker.video import codec
from worker.video.job import render_frame, segment_count


def probe(path: str, **limits):
    return codec.probe(
        path, max_seconds=limits.get("max_seconds", 60), max_pixels=limits.get("max_pixels", 10**7)
    )


def test_probe_refuses_what_is_not_a_usable_video(tmp_path):
    (tmp_path / "page.html").write_bytes(b"<html>no</html>")
    with pytest.raises(codec.VideoLoadError, match="cannot read the file as a video"):
        probe(str(tmp_path / "page.html"))
    with pytest.raises(codec.VideoLoadError, match="audio track but no video stream"):
        probe(make_audio_only(str(tmp_path / "a.mp4")))
    clip = make_clip(str(tmp_path / "c.mp4"), seconds=2.0, fps=6, audio=False)
    with pytest.raises(codec.VideoTooLargeError, match="the limit is 1s"):
        probe(clip, max_seconds=1)
    with pytest.raises(codec.VideoTooLargeError, match="96x64"):
        probe(clip, max_pixels=96 * 64 - 1)
    info = probe(clip)
    assert (info.width, info.height, info.frames, info.has_audio) == (96, 64, 12, False)


def write(
    source: str,
    out: str,
    kind: codec.OutputKind,
    start: float = 0.0,
    end: float | None = None,
    audio: bool = True,
    segment: bool = False,
) -> None:
    info = probe(source)
    writer = None
    for frame in codec.frames(source, start, end):
        if writer is None:
            writer = codec.VideoWriter(
                out,
                kind,
                width=info.width,
                height=info.height,
                rate=info.fps,
                time_base=frame.time_base,
                quality="medium",
                write_mode="fast",
                segment=segment,
                audio_from=source if audio else None,
                rotate=frame.rotation,
            )
        mask = np.zeros(frame.rgb.shape[:2], np.float32)
        mask[:, : frame.rgb.shape[1] // 2] = 1.0
        cut, _ = render_frame(frame.rgb, mask, refine=True, alpha=kind.alpha, background=(0, 255, 0))
        writer.write(cut, frame.pts)
    assert writer is not None
    writer.close()


@pytest.mark.parametrize("output_type", list(codec.OUTPUT_KINDS))
def test_each_output_type_keeps_frames_timestamps_audio_and_alpha(tmp_path, output_type):
    kind = codec.OUTPUT_KINDS[output_type]
    source = make_clip(str(tmp_path / "in.mp4"), seconds=1.0, fps=8)
    write(source, str(tmp_path / f"out{kind.extension}"), kind)
    out, src = read_video(str(tmp_path / f"out{kind.extension}")), read_video(source)
    assert out["frames"] == src["frames"] == 8
    assert out["audio"] == (kind.codec != "gif")
    if kind.alpha:
        assert out["times"] == src["times"]
        assert out["alpha"][:, 0].min() > 240 and out["alpha"][:, -1].max() < 15  # left half kept
    else:
        assert out["alpha"] is None or out["alpha"].min() == 255


def test_segments_join_in_order_with_the_source_timestamps(tmp_path):
    pts = [0, 50, 90, 200, 260, 400, 410, 600, 700, 950]  # variable frame rate, ms
    source = make_clip(str(tmp_path / "vfr.mp4"), frame_pts=pts, rotate=270)
    kind = codec.OUTPUT_KINDS["X264 (.mp4)"]
    parts = []
    for i, (start, end) in enumerate(((0.0, 0.3), (0.3, 0.65), (0.65, 2.0))):
        parts.append(str(tmp_path / f"part{i}.mp4"))
        write(source, parts[-1], kind, start, end, audio=False, segment=True)
    codec.join_segments(parts, str(tmp_path / "joined.mp4"), kind, source)
    joined = read_video(str(tmp_path / "joined.mp4"))
    assert joined["times"] == [p / 1000 for p in pts] and joined["audio"] and joined["rotation"] == 270


def test_only_long_non_gif_videos_are_split():
    mp4, gif = codec.OUTPUT_KINDS["X264 (.mp4)"], codec.OUTPUT_KINDS["GIF (.gif)"]
    assert segment_count(12.0, 10.0, mp4) == 1 and segment_count(16.0, 10.0, mp4) == 2
    assert segment_count(60.0, 10.0, gif) == 1 and segment_count(60.0, 0, mp4) == 1


@pytest.mark.parametrize("output_type", ["X264 (.mp4)", "PRORES4444 (.mov)"])
def test_rotation_metadata_is_kept(tmp_path, output_type):
    kind = codec.OUTPUT_KINDS[output_type]
    source = make_clip(str(tmp_path / "phone.mp4"), seconds=0.5, fps=8, rotate=90)
    assert read_video(source)["rotation"] == 90
    write(source, str(tmp_path / f"out{kind.extension}"), kind)
    assert read_video(str(tmp_path / f"out{kind.extension}"))["rotation"] == 90
