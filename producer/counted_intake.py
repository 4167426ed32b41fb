"""An Intake that counts the events it handles by source and outcome (`birefnet_producer_events_total`);
the SQS consumer and the HTTP endpoint both wrap theirs in it."""

from __future__ import annotations

from common.observability.metrics import PRODUCER_EVENTS
from common.state.limits import QueueFull
from producer.events import ObjectCreated
from producer.intake import Intake


class CountingIntake:
    """Wraps an Intake to count events by outcome (`producer_events_total{source=...}`)."""

    def __init__(self, intake: Intake, source: str):
        self.intake, self.source = intake, source

    def handle(self, event: ObjectCreated) -> str | None:
        try:
            request_id = self.intake.handle(event)
        except QueueFull:
            PRODUCER_EVENTS.labels(self.source, "deferred").inc()
            raise
        except Exception:
            PRODUCER_EVENTS.labels(self.source, "error").inc()
            raise
        PRODUCER_EVENTS.labels(self.source, "enqueued" if request_id else "ignored").inc()
        return request_id
