"""Wiring shared by the producer's entry points."""

from __future__ import annotations

from common.adapters.queue import make_celery
from common.adapters.storage import ObjectStore
from common.settings import Settings
from common.state.jobs import JobStore
from producer.intake import Intake


def build_intake(settings: Settings) -> Intake:
    store = JobStore.from_settings(settings)
    return Intake(settings, store, make_celery(settings), ObjectStore(settings))
