"""Wiring shared by the producer's entry points."""

from __future__ import annotations

from common.jobs import JobStore
from common.queue import make_celery
from common.settings import Settings
from common.storage import ObjectStore
from producer.intake import Intake


def build_intake(settings: Settings) -> Intake:
    store = JobStore.from_settings(settings)
    return Intake(settings, store, make_celery(settings), ObjectStore(settings))
