"""The slim Celery app that delivers webhooks (queue `webhooks`); no torch, no model.

Besides the task, every deliverer runs a small pump thread that re-queues retries as they fall due
(see common/state/webhooks.py for why retries are not Celery countdowns).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict

from celery import Celery
from celery.signals import worker_ready

from common.adapters.queue import DELIVER_WEBHOOK, make_celery, send_webhook
from common.settings import DelivererSettings
from common.state.dev_secrets import webhook_signer
from common.state.jobs import JobStore
from common.state.webhooks import WebhookSender

log = logging.getLogger(__name__)


def create_celery_app(settings: DelivererSettings, store: JobStore) -> Celery:
    """The deliverer's Celery app: the `deliver_webhook` task, and the retry pump started with the worker."""
    app = make_celery(settings, name="birefnet-webhooks")

    @functools.cache
    def sender() -> WebhookSender:
        """Built on first use: without configured keys the signer reads (or makes) its key in Redis."""
        return WebhookSender(settings, store, webhook_signer(settings.webhook_signing_keys, store.redis))

    @app.task(name=DELIVER_WEBHOOK, acks_late=True)
    def deliver_webhook(request_id: str, attempt: int = 0) -> dict | None:
        result = sender().deliver(request_id, attempt)
        if result is not None and not result.ok:
            log.warning("webhook for %s failed (attempt %d): %s", request_id, attempt, result.error)
        return asdict(result) if result is not None else None  # for the delivery metrics (not stored)

    def start_pump(**_) -> None:
        interval = max(0.05, min(1.0, settings.webhook_retry_base / 4))
        threading.Thread(target=pump_retries, args=(app, sender, interval), name="webhook-retries",
                         daemon=True).start()

    worker_ready.connect(start_pump, weak=False)
    return app


def pump_retries(app: Celery, sender: Callable[[], WebhookSender], interval: float) -> None:
    while True:
        time.sleep(interval)
        try:
            for request_id, attempt in sender().claim_due():
                send_webhook(app, request_id, attempt)
        except Exception:  # Redis hiccups must not end the pump; the schedule is still in Redis
            log.warning("webhook retry pump failed; trying again", exc_info=True)
