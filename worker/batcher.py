"""Dynamic batching: jobs running in parallel threads share one forward pass.

Each job's thread fetches, decodes and prepares its own image (resize + normalise; I/O and CPU work
overlap with the forward), hands the network input to the batcher and waits; the mask's resize back,
refinement and encoding happen in the job's thread again. The batcher's single inference thread does
only forwards: it takes the first waiting input, keeps collecting for up to `wait_seconds` or until
`max_size` inputs are waiting, and runs each group of equal operating resolution as one batch. A batch
that fails is retried image by image, so one job's bad input fails that job only.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch

from worker.engine import Predictor
from worker.pipeline.postprocess import mask_probabilities
from worker.pipeline.types import ImageLike, PreparedImage

log = logging.getLogger(__name__)


class ForwardTimeout(Exception):
    """The forward this job was in ran past the job's run-time limit (the job's own attempt ends).
    `shared`: other jobs were in the same forward, so which one made it hang is not known."""

    def __init__(self, message: str, shared: bool = False):
        super().__init__(message)
        self.shared = shared


class WorkerUnavailable(Exception):
    """This worker's inference thread cannot take the job (stuck, or busy past the job's limit before the
    job's forward began): the job is not at fault and goes to another worker."""


@dataclass(eq=False)  # compared by identity: the fields hold arrays
class _Pending:
    resolution: tuple[int, int]
    prepared: PreparedImage
    future: Future = field(default_factory=Future)
    alone: bool = False  # runs in a forward of its own (its job was in a batch that hung)
    started: bool = False  # taken into a forward (guarded by the batcher's lock)
    abandoned: bool = False  # its job stopped waiting; skipped if not started yet
    batch_size: int = 0  # of the forward it was taken into


class MaskBatcher:
    def __init__(self, predictor: Predictor, *, max_size: int, wait_seconds: float):
        self.predictor = predictor
        self.max_size = max(1, max_size)
        self.wait_seconds = max(0.0, wait_seconds)
        self._waiting: queue.Queue[_Pending] = queue.Queue()
        self.batch_sizes: list[int] = []  # recent batch sizes, for logs and benchmarks
        # Progress of the inference thread, for the watchdog: when the forward now running began
        # (time.monotonic(), None while idle) and how many forwards have finished.
        self.forward_started: float | None = None
        self.forwards_done = 0
        self.stuck_reason: str | None = None
        self._lock = threading.Lock()
        self._in_flight: list[_Pending] = []
        self._thread = threading.Thread(target=self._loop, name=f"batcher-{predictor.spec.id}", daemon=True)
        self._thread.start()

    def predict(
        self,
        image: ImageLike,
        resolution: tuple[int, int],
        timeout: float | None = None,
        *,
        alone: bool = False,
    ) -> tuple[np.ndarray, int]:
        """The probabilities (float32 numpy at the image's size) for one image, and the size of the batch it
        ran in: prepare, `infer`, resize back (benchmarks and tests; jobs run the stages themselves)."""
        prepared = self.predictor.prepare(image, resolution)
        logits, batch_size = self.infer(prepared, timeout, alone=alone)
        mask = mask_probabilities(logits, prepared)
        return (mask if isinstance(mask, np.ndarray) else mask.cpu().numpy()), batch_size

    def infer(
        self, prepared: PreparedImage, timeout: float | None = None, *, alone: bool = False
    ) -> tuple[torch.Tensor, int]:
        """The logits of one prepared image and the size of the batch it ran in. Blocks until its forward is
        done, or `timeout` seconds: then ForwardTimeout if its forward had begun, WorkerUnavailable if not.
        `alone`: never batched with other images. Only the forward runs on the batcher's thread."""
        if self.stuck_reason:
            raise WorkerUnavailable(self.stuck_reason)
        resolution = (int(prepared.network_input.shape[-1]), int(prepared.network_input.shape[-2]))
        pending = _Pending(resolution, prepared=prepared, alone=alone)
        self._waiting.put(pending)
        try:
            return pending.future.result(timeout=timeout)
        except TimeoutError:
            with self._lock:
                pending.abandoned = True
                started = pending.started
            if started:
                raise ForwardTimeout(
                    "its forward pass did not finish within the job's run-time limit",
                    shared=pending.batch_size > 1,
                ) from None
            raise WorkerUnavailable(
                "the inference thread was still busy with other forwards when this job's "
                "run-time limit passed"
            ) from None

    def busy_for(self) -> float:
        """Seconds the forward now running has taken (0 while idle)."""
        started = self.forward_started
        return time.monotonic() - started if started is not None else 0.0

    def alive(self) -> bool:
        return self._thread.is_alive()

    def declare_stuck(self, reason: str) -> None:
        """The watchdog's verdict: end the jobs in the running forward (ForwardTimeout) and hand back every
        waiting one (WorkerUnavailable); later calls to predict are refused at once."""
        with self._lock:
            self.stuck_reason = reason
            in_flight, self._in_flight = self._in_flight, []
        for item in in_flight:
            _settle(item.future, exc=ForwardTimeout(reason, shared=len(in_flight) > 1))
        while True:
            try:
                item = self._waiting.get_nowait()
            except queue.Empty:
                break
            _settle(item.future, exc=WorkerUnavailable(reason))

    def _collect(self) -> list[_Pending]:
        batch = [self._waiting.get()]
        deadline = time.monotonic() + self.wait_seconds
        while len(batch) < self.max_size:
            remaining = deadline - time.monotonic()
            try:
                batch.append(
                    self._waiting.get(timeout=remaining) if remaining > 0 else self._waiting.get_nowait()
                )
            except queue.Empty:
                break
        return batch

    def _loop(self) -> None:
        while True:
            batch = self._collect()
            groups: dict[tuple, list[_Pending]] = {}
            for item in batch:
                groups.setdefault((item.resolution, id(item) if item.alone else None), []).append(item)
            for (resolution, _), items in groups.items():
                self._run(resolution, items)

    def _take(self, items: list[_Pending]) -> list[_Pending]:
        """Mark the items that are still wanted as started (the others' jobs gave up waiting)."""
        with self._lock:
            if self.stuck_reason:
                wanted = []
            else:
                wanted = [item for item in items if not item.abandoned]
                for item in wanted:
                    item.started, item.batch_size = True, len(wanted)
                self._in_flight = wanted
        for item in items:
            if item not in wanted:
                _settle(item.future, exc=WorkerUnavailable(self.stuck_reason or "abandoned"))
        return wanted

    def _run(self, resolution: tuple[int, int], items: list[_Pending]) -> None:
        items = self._take(items)
        if not items:
            return
        self.batch_sizes = (self.batch_sizes + [len(items)])[-100:]
        self.forward_started = time.monotonic()
        try:
            logits = self.predictor.forward([item.prepared for item in items])
        except Exception as exc:
            if len(items) == 1:
                _settle(items[0].future, exc=exc)
                return
            log.warning("a batch of %d failed (%s); running its images one by one", len(items), exc)
            for item in items:
                with self._lock:
                    item.abandoned = item.abandoned or item.future.done()
                self._run(resolution, [item])
            return
        finally:
            self.forward_started = None
            self.forwards_done += 1
            with self._lock:
                self._in_flight = []
        for item, row in zip(items, logits, strict=True):
            _settle(item.future, result=(row, len(items)))


def _settle(future: Future, *, result: object = None, exc: BaseException | None = None) -> None:
    """Set a future's outcome unless it has one (the watchdog may have ended it first)."""
    try:
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)
    except Exception:  # InvalidStateError: already settled
        pass
