"""What became of one run of a job (`Outcome`), as the runner returns it and the Celery task acts on it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from common.domain.errors import RequestTimeout

OutcomeKind = Literal["done", "failed", "cancelled", "skipped", "defer", "retry", "handback"]


@dataclass
class Outcome:
    kind: OutcomeKind
    detail: str = ""
    timings: dict[str, float] = field(default_factory=dict)


class JobTimedOut(Exception):
    """This run of the job passed its run-time limit; the attempt counts (see JobRunner._timed_out)."""


TIMEOUT_ERROR_TYPE = RequestTimeout.error_type  # fal: "exceeded the allowed processing time"
