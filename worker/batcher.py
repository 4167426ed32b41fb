"""Dynamic batching: jobs running in parallel threads share one forward pass.

Each job's thread fetches and decodes its own image (I/O overlaps with the GPU), then hands the image
to the batcher and waits. The batcher's single inference thread takes the first waiting image, keeps
collecting for up to `wait_seconds` or until `max_size` images are waiting, and runs each group of
equal operating resolution as one batch. A batch that fails is retried image by image, so one job's
bad input fails that job only.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from worker.engine import Predictor

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    image: Image.Image
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

    def predict(self, image: Image.Image, resolution: tuple[int, int]) -> tuple[np.ndarray, int]:
        """The mask for one image, and the size of the batch it ran in (blocks until done)."""
        pending = _Pending(image, resolution)
        self._waiting.put(pending)
        return pending.future.result()

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
            masks = self.predictor.predict_masks([item.image for item in items], resolution)
        except Exception as exc:
            if len(items) == 1:
                items[0].future.set_exception(exc)
                return
            log.warning("a batch of %d failed (%s); running its images one by one", len(items), exc)
            for item in items:
                self._run(resolution, [item])
            return
        for item, mask in zip(items, masks, strict=True):
            item.future.set_result((mask, len(items)))
