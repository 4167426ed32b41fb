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

from worker.engine import ImageLike, Predictor, PreparedImage

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    prepared: PreparedImage
    resolution: tuple[int, int]
    future: Future = field(default_factory=Future)


class MaskBatcher:
    def __init__(self, predictor: Predictor, *, max_size: int, wait_seconds: float):
        self.predictor = predictor
        self.max_size = max(1, max_size)
        self.wait_seconds = max(0.0, wait_seconds)
        self._waiting: queue.Queue[_Pending] = queue.Queue()
        self.batch_sizes: list[int] = []  # recent batch sizes, for logs and benchmarks
        self._thread = threading.Thread(target=self._loop, name=f"batcher-{predictor.spec.id}", daemon=True)
        self._thread.start()

    def predict(self, image: ImageLike, resolution: tuple[int, int]) -> tuple[np.ndarray, int]:
        """The mask for one image, and the size of the batch it ran in (blocks until done)."""
        mask, batch_size, _ = self.predict_prepared(image, resolution)
        if not isinstance(mask, np.ndarray):
            mask = mask.cpu().numpy()
        return mask, batch_size

    def predict_prepared(self, image: ImageLike, resolution: tuple[int, int]):
        """(mask, batch size, PreparedImage): the mask is a device tensor on CUDA (for render_outputs with
        `prepared`), float32 numpy otherwise. Preparation and the mask's resize run in the calling thread."""
        prepared = self.predictor.prepare(image, resolution)
        pending = _Pending(prepared, resolution)
        self._waiting.put(pending)
        logits, batch_size = pending.future.result()
        return self.predictor.mask_for(logits, prepared), batch_size, prepared

    def _collect(self) -> list[_Pending]:
        batch = [self._waiting.get()]
        deadline = time.monotonic() + self.wait_seconds
        while len(batch) < self.max_size:
            remaining = deadline - time.monotonic()
            try:
                batch.append(self._waiting.get(timeout=remaining) if remaining > 0 else self._waiting.get_nowait())
            except queue.Empty:
                break
        return batch

    def _loop(self) -> None:
        while True:
            batch = self._collect()
            groups: dict[tuple[int, int], list[_Pending]] = {}
            for item in batch:
                groups.setdefault(item.resolution, []).append(item)
            for resolution, items in groups.items():
                self._run(resolution, items)

    def _run(self, resolution: tuple[int, int], items: list[_Pending]) -> None:
        self.batch_sizes = (self.batch_sizes + [len(items)])[-100:]
        try:
            logits = self.predictor.forward([item.prepared for item in items])
        except Exception as exc:
            if len(items) == 1:
                items[0].future.set_exception(exc)
                return
            log.warning("a batch of %d failed (%s); running its images one by one", len(items), exc)
            for item in items:
                self._run(resolution, [item])
            return
        for item, row in zip(items, logits, strict=True):
            item.future.set_result((row, len(items)))
