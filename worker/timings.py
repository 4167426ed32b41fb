"""Per-stage wall seconds of one job (or batch), for its log line and the benchmarks."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


class StageTimings:
    """Seconds spent per named stage, accumulated over calls (batches add up)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._lock = threading.Lock()  # a video's frames record from several threads

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.record(name, time.perf_counter() - started)

    def record(self, name: str, seconds: float) -> None:
        with self._lock:
            self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def as_dict(self, digits: int = 4) -> dict[str, float]:
        return {name: round(value, digits) for name, value in self.seconds.items()}

    def __str__(self) -> str:
        return " ".join(f"{name}={value * 1000:.0f}ms" for name, value in self.seconds.items())
