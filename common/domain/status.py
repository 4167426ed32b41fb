"""A job's status: fal's three. Failures and cancels are COMPLETED with an error (fal's contract); a
StrEnum, so members equal the strings stored in Redis and returned by the API."""

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
