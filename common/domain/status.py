"""A job's status: fal's three, the only values a job record holds.

Failures and cancels are not statuses of their own: they are COMPLETED with an error (fal's contract), so
COMPLETED is the one terminal status. A StrEnum, so members compare equal to, and serialise as, the
strings stored in Redis and returned by the API.
"""

from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    IN_QUEUE = "IN_QUEUE"
    IN_PROGRESS = "IN_PROGRESS"
    COMPLETED = "COMPLETED"

    @property
    def is_terminal(self) -> bool:
        """No transition leaves this status (a requeue by ops starts the job over)."""
        return self in TERMINAL


TERMINAL = frozenset({Status.COMPLETED})
