"""The Celery message a submission's script pushes is the one Celery itself sends (real redis-server; real
workers consume such messages in tests/e2e, where every API submission goes this way)."""

from __future__ import annotations

import base64
import json

import pytest
import redis

from common.adapters import broker
from common.adapters.queue import job_message, make_celery, send_job
from common.domain.schemas import JobSpec
from common.settings import Settings
from common.state import keys
from common.state.jobs import JobStore
from tests.helpers.specs import job_spec

# Fields that differ between any two messages (fresh ids), and the copy of the arguments' summary that
# send_task also leaves among the properties.
PER_MESSAGE = {("headers", "id"), ("headers", "root_id"), ("properties", "correlation_id")}
PER_DELIVERY = {("properties", "delivery_tag"), ("properties", "argsrepr")}


def make_spec(priority: str = "normal") -> JobSpec:
    return job_spec(image_url="data:,x", priority=priority)


@pytest.fixture
def client(redis_server) -> redis.Redis:
    url = redis_server.url.replace("/0", "/7")
    probe = redis.Redis.from_url(url, decode_responses=True)
    probe.flushdb()
    return probe


@pytest.mark.parametrize("priority", ["normal", "low"])
def test_the_message_built_for_the_script_is_the_one_celery_sends(client: redis.Redis, priority: str):
    app = make_celery(Settings(redis_url=_url(client)))
    spec = make_spec(priority)
    send_job(app, spec)
    built = job_message(app, spec)
    (sent_key,) = [key for key in broker.queue_lists(spec.queue) if client.llen(key)]
    assert built.list_key == sent_key, "the list of the message's priority step"
    sent, mine = json.loads(client.lpop(sent_key)), json.loads(built.payload)
    assert set(mine) == set(sent)
    for part in ("headers", "properties"):
        assert set(mine[part]) | {"argsrepr"} == set(sent[part]) | {"argsrepr"}, part
        differ = {(part, name) for name in sent[part] if sent[part][name] != mine[part].get(name)}
        assert differ <= PER_MESSAGE | PER_DELIVERY, differ
    assert {name: sent[name] for name in sent if name not in ("headers", "properties")} == {
        name: mine[name] for name in mine if name not in ("headers", "properties")
    }, "the same body, encoding and content type"
    assert mine["headers"]["argsrepr"] == f"[job {spec.request_id}]", "the id, not the whole spec"
    args, kwargs, _ = json.loads(base64.b64decode(mine["body"]))
    assert args == [spec.model_dump(mode="json")] and kwargs == {}
    decoded = broker.decode(built.payload)
    assert (
        decoded is not None
        and decoded.task == "birefnet.run_job"
        and decoded.job_request_id == spec.request_id
    )


def test_the_record_and_its_message_are_written_together_or_not_at_all(client: redis.Redis):
    url = _url(client)
    store, app = JobStore.from_url(url), make_celery(Settings(redis_url=url))
    spec = make_spec()
    assert store.create(spec, message=job_message(app, spec))
    assert client.llen(spec.queue) == 1 and store.get(spec.request_id) is not None
    assert not store.create(spec, message=job_message(app, spec)), "an id is recorded once"
    assert client.llen(spec.queue) == 1, "a second creation pushes no second message"
    fresh = make_spec()
    assert store.create_queued(fresh, message=job_message(app, fresh)) == 1, "behind the first"
    assert [broker.decode(raw).job_request_id for raw in client.lrange(spec.queue, 0, -1)] == [
        fresh.request_id,
        spec.request_id,
    ], "first in, first out (workers pop from the right)"
    assert client.zrange(keys.pending(spec.variant), 0, -1) == [spec.request_id, fresh.request_id]


def _url(client: redis.Redis) -> str:
    kwargs = client.get_connection_kwargs()
    return f"redis://{kwargs['host']}:{kwargs['port']}/{kwargs.get('db', 0)}"
