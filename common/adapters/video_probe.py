"""The duration a video file's container declares, read from its headers without decoding a frame: how the
gateway counts a video it already holds (a data URI) against its key's budget at submit."""

from __future__ import annotations

import io
import logging

log = logging.getLogger(__name__)


def container_duration(data: bytes) -> float | None:
    """Seconds, or None when the bytes do not say (not a video, no duration in the headers, or unreadable):
    the worker then counts the video when it opens it."""
    import av  # PyAV: only where a video is submitted inline

    try:
        with av.open(io.BytesIO(data), mode="r", metadata_errors="ignore") as container:
            if not container.streams.video:
                return None
            stream = container.streams.video[0]
            if stream.duration is not None and stream.time_base:
                return float(stream.duration * stream.time_base)
            if container.duration is not None:
                return container.duration / av.time_base
    except Exception as exc:  # noqa: BLE001 - any failure only means "unknown here"; the worker reports it
        log.debug("no container duration: %s", exc)
    return None
