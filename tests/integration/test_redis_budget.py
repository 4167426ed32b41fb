"""What a job costs Redis: the state transitions' commands, counted by a real redis-server (INFO
commandstats, which counts the commands scripts run too), and Celery task events off unless asked for."""

from __future__ import annotations

import base64
import json

import kombu
import redis

from common.adapters.queue import make_celery
from common.domain.schemas import JobSpec
from common.settings import Settings
from common.state import keys, ops_state
from common.state.jobs import JobStore, RunReport, log_entry
from common.state.webhooks import Handoff
from tests.helpers.specs import job_spec


def commands(client: redis.Redis) -> int:
    return sum(int(stats["calls"]) for stats in client.info("commandstats").values())


def spec(webhook: str | None = "http://127.0.0.1:9/hook") -> JobSpec:
    return job_spec(image_url="data:,x", webhook_url=webhook, owner="alice")


def run_one(store: JobStore, job: JobSpec) -> None:
    assert store.create(job)
    claimed = store.claim(
        job.request_id,
        job.variant,
        "t",
        lease_seconds=30,
        max_attempts=3,
        worker="w",
        sole_log_writer=True,
        first_line=log_entry("loading image"),
    )
    assert claimed.outcome == "claimed"
    # Nobody watches the job: its other lines go with the completion (the runner writes them before the
    # forward only when watched).
    lines = ["inference 1024x1024", "uploading", "done in 0.10s"]
    assert store.complete(
        job.request_id,
        token="t",
        result={"image": None},
        variant=job.variant,
        logs=[log_entry(line) for line in lines],
        webhook_due=123.0 if job.webhook_url else None,
        report=RunReport("done", "w", 0.1, keep=1000),
    )


def test_a_job_s_record_goes_from_queued_to_completed_in_few_commands(redis_server):
    store = JobStore.from_url(redis_server.url)
    probe = redis.Redis.from_url(redis_server.url)
    run_one(store, spec())  # scripts loaded, connections open
    job = spec()
    before = commands(probe)
    run_one(store, job)
    used = commands(probe) - before - 1  # less the first INFO
    # Counted with what the scripts run, the job's whole path but Celery's message and the webhook's
    # attempt: create 4 (the existence check of an id not minted here, the record without a TTL, its queue
    # entry); claim 5 (one HMGET of status, attempts, run flags, the log count and the watched mark; the
    # record's HSET with the lease token and the run's first line; the lease as its running-set score);
    # completion 8 (one HMGET; the outcome and the lines in one HSET, TTL, out of the running set, the
    # webhook's booking and hand-off to the deliverers, the completions-stream entry; the queue entry went
    # with the claim). Nobody watches the job: no change notice.
    assert used <= 17, used
    record = store.get(job.request_id)
    assert record is not None and record.status == "COMPLETED"
    assert [entry["message"] for entry in store.logs(job.request_id)] == [
        "loading image",
        "inference 1024x1024",
        "uploading",
        "done in 0.10s",
    ]
    # The first webhook attempt is booked with the completion, and the record keeps its TTL.
    assert store.redis.zscore(keys.WEBHOOK_DUE, f"{job.request_id}|0") == 123.0
    assert 0 < store.redis.ttl(keys.job(job.request_id)) <= store.record_ttl
    assert not store.redis.exists(keys.logs(job.request_id)), "the lines live in the record, under its TTL"
    # The ops state: out of the running set, one completions entry with ops' fields.
    assert store.redis.zscore(keys.running(job.variant), job.request_id) is None
    entry = ops_state.read_completions(store.redis, 0)[-1]
    assert entry["request_id"] == job.request_id and entry["outcome"] == "done" and entry["worker"] == "w"
    assert entry["run"] == "0.1000" and float(entry["queue_wait"]) >= 0 and float(entry["latency"]) > 0


def test_a_second_completion_changes_nothing_and_books_nothing(redis_server):
    store = JobStore.from_url(redis_server.url)
    job = spec()
    store.create(job)
    store.claim(job.request_id, job.variant, "t", lease_seconds=30, max_attempts=3, worker="w")
    assert store.complete(job.request_id, token="t", result={"n": 1}, variant=job.variant, webhook_due=1.0)
    store.redis.zrem(keys.WEBHOOK_DUE, f"{job.request_id}|0")  # delivered
    assert not store.complete(
        job.request_id, token="t", result={"n": 2}, logs=[log_entry("late")], webhook_due=2.0
    )
    assert store.get(job.request_id).result == {"n": 1}
    assert store.redis.zscore(keys.WEBHOOK_DUE, f"{job.request_id}|0") is None
    assert store.logs(job.request_id) == []


def test_transitions_publish_only_for_a_watched_job(redis_server):
    store = JobStore.from_url(redis_server.url)
    listener = redis.Redis.from_url(redis_server.url).pubsub()
    listener.psubscribe(keys.EVENTS_PATTERN)
    listener.get_message(timeout=1)

    def heard() -> list[tuple[str, str]]:
        messages = []
        while (message := listener.get_message(timeout=0.5)) is not None:
            messages.append((message["channel"].decode(), message["data"].decode()))
        return messages

    quiet, watched = spec(webhook=None), spec(webhook=None)
    run_one(store, quiet)
    assert heard() == [], "nobody watches it: no notice"
    assert store.create_queued(watched, watched=True) is not None  # a sync run's job
    store.claim(watched.request_id, watched.variant, "t", lease_seconds=30, max_attempts=3, worker="w")
    store.complete(watched.request_id, token="t", result={}, variant=watched.variant)
    # One notice per transition on the job's channel; the claim took the job off its queue, so it names
    # the variant; the completion of a claimed job leaves the queue alone.
    job_channel = keys.job_channel(watched.request_id)
    assert heard() == [(job_channel, watched.variant), (job_channel, "")]


def test_celery_task_events_are_off_unless_asked_for():
    assert make_celery(Settings()).conf.worker_send_task_events is False
    assert make_celery(Settings()).conf.task_send_sent_event is False
    on = make_celery(Settings(celery_task_events=True)).conf
    assert on.worker_send_task_events is True and on.task_send_sent_event is True
    assert json.dumps(on.broker_transport_options)  # the rest of the configuration is intact


def test_the_completion_hands_its_webhook_to_the_deliverers(redis_server):
    store = JobStore.from_url(redis_server.url)
    store.redis.delete(keys.WEBHOOK_READY)  # what earlier tests on this server handed off
    job = spec()
    run_one(store, job)
    (entry,) = store.redis.lrange(keys.WEBHOOK_READY, 0, -1)
    handoff = Handoff.parse(entry)
    assert handoff is not None and (handoff.request_id, handoff.attempt, handoff.due) == (
        job.request_id,
        0,
        123,
    )
    delivery = handoff.delivery
    assert (
        delivery.webhook_url,
        delivery.user_id,
        delivery.result,
        delivery.result_code,
        delivery.error,
    ) == (
        "http://127.0.0.1:9/hook",
        "alice",
        {"image": None},
        200,
        None,
    ), "what the attempt posts, so the deliverer reads nothing"
    quiet = spec(webhook=None)
    run_one(store, quiet)
    assert store.redis.llen(keys.WEBHOOK_READY) == 1, "no webhook, no hand-off"
    older = spec()
    store.create(older)
    store.redis.hdel(keys.job(older.request_id), "webhook_url", "webhook_user")  # as an older release wrote
    store.complete(older.request_id, result={}, variant=older.variant, webhook_due=1.0)
    assert store.redis.lindex(keys.WEBHOOK_READY, 0) == f"{older.request_id}|0", "the deliverer reads it"
    big = spec()  # a sync_mode result: data URIs
    store.create(big)
    result = {"image": {"url": "data:image/png;base64," + "A" * 70_000}}
    store.complete(big.request_id, result=result, variant=big.variant, webhook_due=1.0)
    assert store.redis.lindex(keys.WEBHOOK_READY, 0) == f"{big.request_id}|0", "a big result is not copied"


def test_a_delivered_job_message_costs_its_pop_only_and_an_unstarted_one_goes_back_at_close(redis_server):
    """No ack emulation: the pop is the delivery (no `unacked` hash or index, nothing at the ack), and a
    consumer closing with a message it has not acknowledged puts it back (a warm shutdown's prefetch)."""
    settings = Settings(redis_url=redis_server.url.replace("/0", "/9"))
    probe = redis.Redis.from_url(settings.redis_url)
    probe.flushdb()
    app = make_celery(settings)
    queue_name = "birefnet.no-ack-emulation"
    with app.connection_for_write() as conn:
        queue = kombu.Queue(queue_name, routing_key=queue_name)
        with conn.Producer() as producer:
            producer.publish({"n": 1}, routing_key=queue_name, declare=[queue])
            producer.publish({"n": 2}, routing_key=queue_name, declare=[queue])
        taken: list = []
        channel = conn.channel()
        channel.basic_qos(0, 2, False)
        with kombu.Consumer(channel, [queue], callbacks=[lambda body, message: taken.append(message)]):
            before = {k: int(v["calls"]) for k, v in probe.info("commandstats").items()}
            conn.drain_events(timeout=10)
            conn.drain_events(timeout=10)
            taken[0].ack()
            after = {k: int(v["calls"]) for k, v in probe.info("commandstats").items()}
            assert len(taken) == 2 and probe.llen(queue_name) == 0
        channel.close()  # the second message was never acknowledged: it goes back
    moved = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
    moved.pop("cmdstat_info", None)
    assert set(moved) <= {"cmdstat_brpop"}, f"a delivery and its ack cost only the pop: {moved}"
    assert not probe.exists("unacked", "unacked_index")
    (back,) = [json.loads(raw) for raw in probe.lrange(queue_name, 0, -1)]
    assert json.loads(base64.b64decode(back["body"])) == {"n": 2}, "the unacknowledged one is back"
