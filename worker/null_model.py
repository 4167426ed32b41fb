"""The benchmark-only null model: a constant mask instead of a network.

It exists to measure everything around the forward (decoding, refinement, encoding, Celery, Redis, S3,
webhooks) without the network's cost. It is selected only by the explicit `benchmark_null_model`
setting; the predictor then reports itself as untrained, and every job log line, worker log line and
result says NULL MODEL.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

NULL_MODEL_BANNER = (
    "NULL MODEL (benchmark only): no network ran; every mask is the same constant ellipse "
    "(BIREFNET_BENCHMARK_NULL_MODEL)"
)


class NullNetwork(nn.Module):
    """(N, 3, H, W) -> (N, 1, H, W) logits of one fixed soft-edged ellipse, whatever the input."""

    def __init__(self) -> None:
        super().__init__()
        self._cache: dict[tuple, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        key = (height, width, x.device, x.dtype)
        logits = self._cache.get(key)
        if logits is None:
            ys = (torch.arange(height, device=x.device, dtype=torch.float32) + 0.5) / height - 0.5
            xs = (torch.arange(width, device=x.device, dtype=torch.float32) + 0.5) / width - 0.5
            distance = torch.sqrt((xs[None, :] / 0.3) ** 2 + (ys[:, None] / 0.4) ** 2)
            alpha = ((1 - distance) * 20 + 0.5).clamp(1e-4, 1 - 1e-4)  # a soft edge a few % wide
            logits = torch.logit(alpha).to(x.dtype)[None, None]
            self._cache[key] = logits
        return logits.expand(x.shape[0], 1, height, width)


def mark_process_logs() -> None:
    """Prefix every log record this process makes from now on (any logger, any handler, including the
    ones Celery installs later), so no log line can be mistaken for a real model's."""
    factory = logging.getLogRecordFactory()
    if getattr(factory, "null_model_marker", False):
        return

    def marked(*args, **kwargs) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        record.msg = f"[NULL MODEL benchmark] {record.msg}"
        return record

    marked.null_model_marker = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(marked)
