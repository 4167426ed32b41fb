"""What one job carries beside its stages: stage timings, its log lines and their labels.

Log lines are written per stage, not per line: those up to the forward just before it runs (what a caller
watching sees while it waits), the rest with the completion, in its round trip. A predictor that is not a
trained model labels every line (null model) and says so up front (untrained weights); a quick-run
override of the operating resolution is announced the same way."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import redis

from common.domain.schemas import JobSpec
from common.state.jobs import JobStore, log_entry
from worker.engine import Predictor
from worker.run_overrides import RunOverrides
from worker.timings import StageTimings

log = logging.getLogger(__name__)


@dataclass
class JobContext:
    spec: JobSpec
    store: JobStore
    predictor: Predictor
    resolution: str  # the operating resolution the forward runs at ("WxH")
    timings: StageTimings = field(default_factory=StageTimings)
    lines: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)

    @classmethod
    def open(
        cls, spec: JobSpec, store: JobStore, predictor: Predictor, overrides: RunOverrides
    ) -> JobContext:
        return cls(spec, store, predictor, overrides.resolution(spec.params.operating_resolution))

    @property
    def size(self) -> tuple[int, int]:
        """The operating resolution as (width, height)."""
        width, height = (int(v) for v in self.resolution.split("x"))
        return width, height

    def stage(self, name: str):
        return self.timings.stage(name)

    @contextmanager
    def timed(self, name_of) -> Iterator[None]:
        """A stage whose name is known only at its end: `name_of()` is asked then."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.timings.record(name_of(), time.perf_counter() - started)

    def log(self, message: str, level: str = "INFO") -> None:
        """Buffered until the next `flush` (or the completion)."""
        self.lines.append(log_entry(self.predictor.log_prefix + message, level))

    def log_now(self, request_id: str, message: str, level: str = "INFO") -> None:
        """Written at once (videos report progress as it comes)."""
        self.store.log(request_id, self.predictor.log_prefix + message, level)

    def flush(self) -> None:
        self.store.log_many(self.spec.request_id, self.lines)
        self.lines.clear()

    def flush_quietly(self) -> None:
        """What a failed stage had not written yet; a Redis outage here is only logged."""
        try:
            self.flush()
        except redis.RedisError:
            log.warning("could not write the log lines of %s", self.spec.request_id)

    def announce_inference(self, image_size: tuple[int, int]) -> None:
        """The lines before a forward: where it runs, and what about its result is not a real model's."""
        requested = self.spec.params.operating_resolution
        if not self.spec.reuse_from:
            self.log(
                f"inference {self.resolution} on {self.predictor.device} ({image_size[0]}x{image_size[1]} "
                f"input)"
            )
        if self.resolution != requested:
            self.log(
                f"TEST MODE: ran at {self.resolution}, not {requested} (BIREFNET_TEST_OPERATING_RESOLUTION)",
                "WARN",
            )
        if self.predictor.untrained and not self.predictor.null_model:
            self.log(self.predictor.result_warning or "", "WARN")

    def finish(self) -> dict[str, float]:
        """The stage seconds with the total, and the job's last line."""
        seconds = dict(self.timings.seconds)
        seconds["total"] = time.perf_counter() - self.started
        self.log(f"done in {seconds['total']:.2f}s")
        return seconds

    def take_lines(self) -> list[str]:
        lines, self.lines = self.lines, []
        return lines
