"""The slim Celery app that delivers webhooks (queue `webhooks`); no torch, no model."""

from __future__ import annotations

import logging

from common.jobs import JobStore
from common.queue import DELIVER_WEBHOOK, make_celery
from common.settings import Settings
from common.webhooks import deliver_once

log = logging.getLogger(__name__)
settings = Settings()
app = make_celery(settings, name="birefnet-webhooks")
store = JobStore.from_url(settings.redis_url, record_ttl=settings.job_record_ttl)


@app.task(name=DELIVER_WEBHOOK, acks_late=True)
def deliver_webhook(request_id: str, attempt: int = 0) -> None:
    result = deliver_once(store, request_id, timeout=settings.webhook_timeout, attempt=attempt)
    if result is not None and not result.ok:
        log.warning("webhook for %s failed (attempt %d): %s", request_id, attempt, result.error)
