"""A job whose broker message was lost is sent again; one that still has its message is not."""

from __future__ import annotations

import time
import uuid

from common.adapters.queue import make_celery, send_job
from common.domain.schemas import JobParams, JobSpec
from common.settings import Settings
from common.state import keys
from common.state.jobs import JobStore
from common.state.orphans import resend_orphans
from devstack.services import RedisServer


def test_lost_message_is_resent_once(redis_server: RedisServer):
    url = f"redis://127.0.0.1:{redis_server.port}/0"
    store = JobStore.from_url(url)
    store.redis.flushdb()
    celery = make_celery(Settings(redis_url=url))
    old = time.time() - 600

    def job() -> JobSpec:
        rid = str(uuid.uuid4())
        spec = JobSpec(
            request_id=rid,
            variant="general-light",
            image_url="s3://b/k.png",
            params=JobParams(),
            output_prefix=f"results/requests/{rid}/",
            created_at=old,
        )
        store.create(spec)
        return spec

    lost, queued, fresh = job(), job(), job()
    send_job(celery, queued)  # still has its message
    fresh_spec = fresh.model_copy(update={"created_at": time.time()})
    store.redis.hset(keys.job(fresh.request_id), "created_at", repr(fresh_spec.created_at))

    resent = resend_orphans(store, celery, "general-light", "birefnet.general-light", min_age=60)
    assert resent == [lost.request_id], "only the old job without a message is sent again"
    assert store.redis.llen("birefnet.general-light") == 2
    assert resend_orphans(store, celery, "general-light", "birefnet.general-light", min_age=60) == [], (
        "one look per period"
    )
    store.redis.delete("birefnet:orphans:general-light")
    assert resend_orphans(store, celery, "general-light", "birefnet.general-light", min_age=60) == [], (
        "its message is in the queue now"
    )
