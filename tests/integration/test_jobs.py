"""Job records against a real redis-server: states, leases, cancel, queue positions."""

from __future__ import annotations

import uuid

import pytest

from common.domain.schemas import JobSpec
from common.state import keys
from common.state.jobs import JobStore, log_entry
from devstack.services import RedisServer
from tests.helpers.specs import job_spec


@pytest.fixture
def store(redis_server: RedisServer) -> JobStore:
    job_store = JobStore.from_url(f"redis://127.0.0.1:{redis_server.port}/0")
    job_store.redis.flushdb()
    return job_store


def make_spec(variant: str = "general-light", priority: str = "normal") -> JobSpec:
    return job_spec(variant, priority=priority)


def claim(store: JobStore, spec: JobSpec, token: str = "t1", attempts: int = 3) -> str:
    return store.claim(
        spec.request_id, spec.variant, token, lease_seconds=5, max_attempts=attempts, worker="w"
    ).outcome


def test_queue_positions_follow_submission_order_and_priority(store: JobStore):
    first, second, low, third = make_spec(), make_spec(), make_spec(priority="low"), make_spec()
    for spec in (first, second, low, third):
        assert store.create(spec)
    assert not store.create(first), "an id is recorded once"
    assert [store.queue_position(s.request_id, s.variant) for s in (first, second, third, low)] == [
        0,
        1,
        2,
        3,
    ]
    assert claim(store, first) == "claimed"
    assert store.queue_position(second.request_id, "general-light") == 0
    assert store.queue_position(first.request_id, "general-light") is None
    assert store.status(first.request_id) == "IN_PROGRESS"


def calls(store: JobStore) -> dict[str, int]:
    return {
        name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in store.redis.info("commandstats").items()
    }


def test_a_submission_is_recorded_booked_and_placed_in_one_round_trip(store: JobStore):
    low, first, second = make_spec(priority="low"), make_spec(), make_spec()
    assert store.create_queued(low) == 0
    listener = store.redis.pubsub()
    listener.psubscribe(keys.EVENTS_PATTERN)
    listener.get_message(timeout=1)
    before = calls(store)
    outputs = {keys.OUTPUTS: (f"req:{first.request_id}", 1234.5), keys.DEADLINES: (first.request_id, 99.0)}
    assert store.create_queued(first, outputs) == 0, "a normal job goes ahead of a low-priority one"
    used = {name: n - before.get(name, 0) for name, n in calls(store).items() if n > before.get(name, 0)}
    # One script call (one round trip): the record, its queue entry, the two bookings and the position, as
    # Redis counts them; no existence check for a request id just minted, no TTL, no notice.
    assert used == {"evalsha": 1, "hset": 1, "zadd": 3, "zrank": 1, "info": 1}, used
    assert store.redis.ttl(keys.job(first.request_id)) == -1, "a waiting job's record does not expire"
    assert store.redis.zscore(keys.OUTPUTS, f"req:{first.request_id}") == 1234.5
    assert store.redis.zscore(keys.DEADLINES, first.request_id) == 99.0
    assert store.queue_position(low.request_id, low.variant) == 1
    assert listener.get_message(timeout=0.5) is None, "queued callers poll their position: no notice"
    assert store.create_queued(second, {keys.OUTPUTS: (f"req:{second.request_id}", 1.0)}) == 1
    assert not store.create(first, {keys.OUTPUTS: (f"req:{first.request_id}", 5.0)})
    assert store.redis.zscore(keys.OUTPUTS, f"req:{first.request_id}") == 1234.5, "a known id books nothing"
    assert store.get(first.request_id) is not None


def test_a_leased_job_is_not_run_twice_and_completes_once(store: JobStore):
    spec = make_spec()
    store.create(spec)
    assert claim(store, spec, "a") == "claimed"
    assert claim(store, spec, "b") == "leased", "a redelivered copy must wait while the lease is alive"
    assert not store.complete(spec.request_id, token="b", result={"x": 1}), "only the lease holder completes"
    assert store.complete(spec.request_id, token="a", result={"image": {}}, inference_time=0.5)
    assert not store.complete(spec.request_id, token="a", result={"again": 1})
    record = store.get(spec.request_id)
    assert record.status == "COMPLETED" and record.result == {"image": {}} and record.inference_time == 0.5
    assert claim(store, spec, "c") == "completed"


def test_expired_lease_is_claimed_again_until_attempts_run_out(store: JobStore):
    spec = make_spec()
    store.create(spec)
    for _ in range(2):
        assert claim(store, spec, attempts=2) == "claimed"
        store.redis.zadd(keys.running(spec.variant), {spec.request_id: 0}, xx=True)  # the worker died
    assert claim(store, spec, attempts=2) == "exhausted"


def test_cancel_in_queue_in_progress_and_completed(store: JobStore):
    queued, running = make_spec(), make_spec()
    store.create(queued)
    store.create(running)
    claim(store, running)
    assert store.cancel(queued.request_id) == "cancelled"
    record = store.get(queued.request_id)
    assert (
        record.status == "COMPLETED" and record.error_type == "client_cancelled" and record.result_code == 499
    )
    assert claim(store, queued) == "completed", "a cancelled job never runs"
    assert store.cancel(running.request_id) == "requested" and store.cancel_requested(running.request_id)
    assert store.cancel(queued.request_id) == "already_completed"
    assert store.cancel(str(uuid.uuid4())) == "not_found"
    # The running job's completion records the cancel instead of its result, as the cancel of a queued job.
    completed = store.complete(running.request_id, token="t1", result={"image": "x"}, variant=running.variant)
    assert completed is not None and completed.cancelled and completed.error_type == "client_cancelled"
    ended = store.get(running.request_id)
    assert (ended.result, ended.result_code, ended.error, ended.error_type) == (
        record.result,
        499,
        record.error,
        "client_cancelled",
    )
    assert store.complete(running.request_id, token="t1", result={}) is None, "completed once"
    done = make_spec()
    store.create(done)
    claim(store, done)
    completed = store.complete(done.request_id, token="t1", result={"image": "x"}, variant=done.variant)
    assert (
        completed is not None
        and not completed.cancelled
        and store.get(done.request_id).result == {"image": "x"}
    )


def test_log_lines_live_in_the_record_and_share_its_ttl(store: JobStore):
    spec = make_spec()
    store.create(spec)
    assert claim(store, spec) == "claimed"
    store.log(spec.request_id, "loading image")
    assert not store.redis.exists(keys.logs(spec.request_id)), "no list of their own"
    assert store.complete(
        spec.request_id, token="t1", result={}, variant=spec.variant, logs=[log_entry("done")]
    )
    assert [e["message"] for e in store.logs(spec.request_id)] == ["loading image", "done"]
    assert store.redis.hget(keys.job(spec.request_id), keys.LOG_COUNT_FIELD) == "2"
    assert 0 < store.redis.ttl(keys.job(spec.request_id)) <= store.record_ttl


def test_a_sole_writer_and_other_writers_never_take_the_same_line_number(store: JobStore, redis_server):
    spec = make_spec()
    store.create(spec)
    other = JobStore.from_url(redis_server.url)  # another process: the unserved sweep, a video segment, ops
    other.log(spec.request_id, "no worker serves this model yet", "WARN")  # queued: numbered by the script
    claimed = store.claim(
        spec.request_id,
        spec.variant,
        "t1",
        lease_seconds=30,
        max_attempts=3,
        worker="w",
        sole_log_writer=True,
    )
    assert claimed.log_count == 1
    store.log_many(spec.request_id, [log_entry("loading image"), log_entry("inference")])  # one HSET
    store.log(spec.request_id, "handed to another worker", "WARN")
    assert store.requeue(spec.request_id, spec.variant, "t1", refund_attempt=True)
    store.log(spec.request_id, "after the requeue")  # no longer the holder: the script numbers it
    other.log(spec.request_id, "from elsewhere")
    assert claim(store, spec, token="t2") == "claimed"
    assert store.complete(
        spec.request_id, token="t2", result={}, variant=spec.variant, logs=[log_entry("end")]
    )
    assert [e["message"] for e in store.logs(spec.request_id)] == [
        "no worker serves this model yet",
        "loading image",
        "inference",
        "handed to another worker",
        "after the requeue",
        "from elsewhere",
        "end",
    ]
    assert [e["message"] for e in store.logs(spec.request_id, 5)] == ["from elsewhere", "end"]


def test_a_record_written_before_the_lines_moved_in_still_shows_its_list(store: JobStore):
    spec = make_spec()
    store.create(spec)
    store.redis.rpush(keys.logs(spec.request_id), log_entry("old line"), log_entry("older format"))
    assert [e["message"] for e in store.logs(spec.request_id, 1)] == ["older format"]


def test_a_line_for_a_record_that_is_gone_does_not_recreate_it(store: JobStore):
    store.log("no-such-job", "late line")
    assert not store.redis.exists(keys.job("no-such-job"))


def test_logs_are_fal_shaped(store: JobStore):
    spec = make_spec()
    store.create(spec)
    store.log(spec.request_id, "loading image")
    store.log(spec.request_id, "inference 1024x1024")
    logs = store.logs(spec.request_id)
    assert [entry["message"] for entry in logs] == ["loading image", "inference 1024x1024"]
    assert set(logs[0]) == {"message", "level", "source", "timestamp"} and logs[0]["timestamp"].endswith("Z")
    assert store.logs(spec.request_id, start=1)[0]["message"] == "inference 1024x1024"


def test_object_versions_map_to_one_job(store: JobStore):
    assert store.job_for_object("fp1", "job-a") == "job-a"
    assert store.job_for_object("fp1", "job-b") == "job-a"
    assert store.job_for_object("fp2", "job-b") == "job-b"


def test_every_run_s_first_line_is_written_by_its_claim(store: JobStore):
    spec = make_spec()
    store.create(spec)

    def run(token: str) -> int:
        taken = store.claim(
            spec.request_id,
            spec.variant,
            token,
            lease_seconds=30,
            max_attempts=5,
            worker="w",
            sole_log_writer=True,
            first_line=log_entry("loading image"),
        )
        assert taken.outcome == "claimed"
        store.redis.zadd(
            keys.running(spec.variant), {spec.request_id: 0}, xx=True
        )  # killed: the lease lapses
        return taken.log_count

    assert run("a") == 1 and run("b") == 2, "the line is numbered with the record's count"
    assert [entry["message"] for entry in store.logs(spec.request_id)] == ["loading image"] * 2
    assert store.cancel(spec.request_id) == "requested"
    assert run("c") == 2, "a run that ends at once for a cancel writes no line"
    store.log_many(spec.request_id, [log_entry("cancelled")])
    assert [entry["message"] for entry in store.logs(spec.request_id)][-1] == "cancelled"
