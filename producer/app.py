"""Wiring shared by the producer's entry points."""

from __future__ import annotations

from common.jobs import JobStore
from common.queue import make_celery
from common.settings import Settings
from common.storage import ObjectStore
from producer.intake import Intake


def build_intake(settings: Settings) -> Intake:
    store = JobStore.from_url(settings.redis_url, record_ttl=settings.job_record_ttl)
    return Intake(settings, store, make_celery(settings), ObjectStore(settings))
