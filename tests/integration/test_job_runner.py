"""worker/runner.py's JobRunner in this process, over every outcome it can return: a real redis-server, moto
S3, the null-model predictor (a constant mask, no network), no Celery worker (the Celery app only books
webhook tasks, which these jobs have none of, and a video's segment jobs, which the video's own run takes)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import pytest

from common.adapters.queue import make_celery
from common.adapters.storage import RESULT_DOCUMENT, ObjectStore, request_output_prefix
from common.domain.schemas import JobParams, JobSpec
from common.domain.video import VideoOptions
from common.settings import Settings
from common.state import keys, ops_state
from common.state.jobs import JobRecord, JobStore
from tests.helpers.hooked_worker import HooksForTests, install, install_forward_hook
from tests.helpers.images import data_uri, png_bytes
from tests.helpers.pipeline import put, s3_client
from tests.helpers.stack import Stack
from tests.helpers.video import make_clip, read_video
from worker.engine import Predictor
from worker.null_model import NULL_MODEL_BANNER
from worker.pipeline.types import PreparedImage
from worker.runner import TIMEOUT_ERROR_TYPE, JobRunner
from worker.video.job import segment_specs

VARIANT = "general-light"
IMAGE = data_uri(png_bytes((40, 30)))


@dataclass
class Harness:
    """A runner with a null-model predictor; `during_forward` runs inside each forward (in the batcher's
    thread)."""

    settings: Settings
    store: JobStore
    stack: Stack
    runner: JobRunner
    during_forward: list[Callable[[], None]] = field(default_factory=list)

    def job(self, image_url: str = IMAGE, variant: str = VARIANT, create: bool = True, **fields) -> JobSpec:
        rid = uuid.uuid4().hex
        spec = JobSpec(
            request_id=rid,
            variant=variant,
            image_url=image_url,
            params=fields.pop("params", JobParams(output_format="png")),
            output_prefix=fields.pop("output_prefix", request_output_prefix(self.settings, rid)),
            **fields,
        )
        if create:
            assert self.store.create(spec)
        return spec

    def record(self, spec: JobSpec) -> JobRecord:
        record = self.store.get(spec.request_id)
        assert record is not None
        return record

    def attempts(self, spec: JobSpec) -> int:
        return int(self.store.redis.hget(keys.job(spec.request_id), "attempts") or 0)


def make_harness(stack: Stack, hooks: HooksForTests | None = None, **overrides) -> Harness:
    settings = stack.settings.model_copy(
        update={
            "device": "cpu",
            "benchmark_null_model": True,
            "warmup_forward": False,
            "max_batch_size": 1,
            "batch_wait_ms": 0,
            **overrides,
        }
    )
    predictor = Predictor(settings.variants.get(VARIANT), settings)
    predictor.load()
    store = JobStore.from_url(settings.redis_url)
    in_forward: list[Callable[[], None]] = []

    def forward_hook(images: Sequence[PreparedImage]) -> None:
        for hook in in_forward:
            hook()

    install_forward_hook(predictor, forward_hook)
    runner = JobRunner(
        settings, store, ObjectStore(settings), make_celery(settings), {VARIANT: predictor}, "test-runner:1"
    )
    if hooks is not None:
        install(runner, hooks)
    return Harness(settings, store, stack, runner, in_forward)


@pytest.fixture
def harness(stack: Stack) -> Iterator[Harness]:
    yield make_harness(stack)


def assert_ended_with(h: Harness, spec: JobSpec, code: int, error_type: str, fragment: str) -> None:
    """The job is completed with this error (what the result endpoint and the webhook will say)."""
    record = h.record(spec)
    assert record.status == "COMPLETED" and record.result_code == code, record
    assert record.error_type == error_type and fragment in (record.error or ""), record.error


# --- done -------------------------------------------------------------------------------------------
def test_a_job_is_done_with_its_outputs_in_s3(harness: Harness):
    spec = harness.job(params=JobParams(output_format="png", output_mask=True))
    outcome = harness.runner.run(spec)
    assert outcome.kind == "done" and {"fetch", "decode", "inference", "render", "upload", "total"} <= set(
        outcome.timings
    )
    record = harness.record(spec)
    assert record.ok and record.result_code == 200 and record.inference_time is not None
    assert record.result["warning"] == NULL_MODEL_BANNER
    assert (record.result["image"]["width"], record.result["image"]["height"]) == (40, 30)
    assert record.result["mask_image"]["content_type"] == "image/png"
    s3 = s3_client(harness.settings)
    stored = {
        o["Key"]
        for o in s3.list_objects_v2(Bucket=harness.settings.output_bucket, Prefix=spec.output_prefix)[
            "Contents"
        ]
    }
    assert {spec.output_prefix + name for name in ("cutout.png", "mask.png", RESULT_DOCUMENT)} <= stored
    assert harness.store.redis.zscore(keys.running(VARIANT), spec.request_id) is None, "the lease is released"
    assert spec.request_id not in harness.runner.running_jobs()


def completions_of(h: Harness, spec: JobSpec) -> list[dict]:
    return [e for e in ops_state.read_completions(h.store.redis, 0) if e["request_id"] == spec.request_id]


def running_ids(h: Harness) -> list[str]:
    return ops_state.running_jobs(h.store.redis, [VARIANT])[VARIANT]


def test_ops_see_a_job_running_while_it_runs_and_one_completion_after(harness: Harness):
    spec = harness.job()
    during: list[list[str]] = []
    harness.during_forward.append(lambda: during.append(running_ids(harness)))
    assert harness.runner.run(spec).kind == "done"
    assert during == [[spec.request_id]], "running (in the running set, with a live lease) during its forward"
    assert spec.request_id not in running_ids(harness)
    assert harness.store.redis.zscore(keys.running(VARIANT), spec.request_id) is None
    [entry] = completions_of(harness, spec)
    assert (entry["outcome"], entry["worker"], entry["variant"], entry["error_type"]) == (
        "done",
        "test-runner:1",
        VARIANT,
        "",
    )
    assert float(entry["run"]) > 0 and float(entry["queue_wait"]) >= 0 and float(entry["latency"]) > 0


def test_an_existing_result_for_the_same_input_is_reused(harness: Harness):
    first = harness.job(input_fingerprint="fp-1")
    assert harness.runner.run(first).kind == "done"
    again = harness.job(input_fingerprint="fp-1", output_prefix=first.output_prefix)
    outcome = harness.runner.run(again)
    assert (outcome.kind, outcome.detail) == ("done", "reused")
    record = harness.record(again)
    assert record.ok and record.extra.get("reused") is True
    assert record.result["image"] == harness.record(first).result["image"]


# --- claims that run nothing ------------------------------------------------------------------------
def test_a_completed_job_is_skipped(harness: Harness):
    spec = harness.job()
    assert harness.runner.run(spec).kind == "done"
    outcome = harness.runner.run(spec)
    assert (outcome.kind, outcome.detail) == ("skipped", "already completed")


def test_a_job_leased_by_another_worker_is_deferred(harness: Harness):
    spec = harness.job()
    taken = harness.store.claim(
        spec.request_id, spec.variant, "elsewhere", lease_seconds=60, max_attempts=3, worker="other"
    )
    assert taken.outcome == "claimed"
    outcome = harness.runner.run(spec)
    assert (outcome.kind, outcome.detail) == ("defer", "another worker holds the lease")
    record = harness.record(spec)
    assert (record.status, record.worker, record.attempts) == ("IN_PROGRESS", "other", 1)


def test_a_job_without_a_record_is_skipped(harness: Harness, monkeypatch: pytest.MonkeyPatch):
    spec = harness.job(create=False)
    monkeypatch.setattr(harness.store, "ensure", lambda spec: None)  # the record expired between the two
    outcome = harness.runner.run(spec)
    assert (outcome.kind, outcome.detail) == ("skipped", "job record missing")


@pytest.mark.parametrize(
    "last_type, max_attempts, code, error_type, fragment",
    [
        ("", None, 503, "runner_disconnected", "moved to the dead-letter list"),
        ("", 1, 503, "runner_disconnected", "asked for no retries (x-fal-no-retry)"),
        (TIMEOUT_ERROR_TYPE, None, 504, TIMEOUT_ERROR_TYPE, "ended at its run-time limit"),
    ],
)
def test_exhausted_attempts_end_the_job_and_dead_letter_it(
    harness: Harness, last_type, max_attempts, code, error_type, fragment
):
    spec = harness.job(max_attempts=max_attempts)
    allowed = max_attempts or harness.settings.max_job_attempts
    harness.store.redis.hset(
        keys.job(spec.request_id),
        mapping={"attempts": allowed, "last_error": "worker stopped", "last_error_type": last_type},
    )
    outcome = harness.runner.run(spec)
    assert outcome.kind == "failed", outcome
    assert_ended_with(harness, spec, code, error_type, fragment)
    assert outcome.detail.startswith("attempts exhausted")
    assert harness.store.redis.zscore(keys.DEADLETTER, spec.request_id) is not None


def test_a_stuck_worker_hands_jobs_back_untouched(harness: Harness):
    harness.runner.health.trip("test")
    spec = harness.job()
    outcome = harness.runner.run(spec)
    assert outcome.kind == "handback" and "worker is stuck: test" in outcome.detail
    assert harness.record(spec).status == "IN_QUEUE" and harness.attempts(spec) == 0


# --- the job's own errors -----------------------------------------------------------------------------
def test_a_passed_start_deadline_fails_with_504(harness: Harness):
    spec = harness.job(start_deadline=time.time() - 1)
    outcome = harness.runner.run(spec)
    assert outcome.kind == "failed", outcome
    assert_ended_with(harness, spec, 504, "request_timeout", "timed out before it started")
    assert outcome.detail == "start deadline passed"


def test_a_variant_this_worker_does_not_serve_fails_with_503(harness: Harness):
    spec = harness.job(variant="general-heavy")
    outcome = harness.runner.run(spec)
    assert outcome.kind == "failed", outcome
    assert_ended_with(harness, spec, 503, "runner_scheduling_failure", "does not serve")


def test_invalid_input_fails_before_any_work(stack: Stack):
    harness = make_harness(stack, hooks=HooksForTests.model_construct(unsupported_output_formats=("avif",)))
    forwards: list[bool] = []
    harness.during_forward.append(lambda: forwards.append(True))
    spec = harness.job(params=JobParams(output_format="avif"))
    outcome = harness.runner.run(spec)
    assert outcome.kind == "failed", outcome
    assert_ended_with(harness, spec, 422, "unsupported_output_format", "is not supported by this server")
    assert not forwards, "nothing is computed for an input that cannot be served"


def test_a_download_error_fails_the_job(harness: Harness):
    spec = harness.job(f"s3://{harness.settings.input_bucket}/missing.png")
    outcome = harness.runner.run(spec)
    assert outcome.kind == "failed", outcome
    assert_ended_with(harness, spec, 422, "file_download_error", "NoSuchKey")


def test_an_undecodable_image_fails_the_job(harness: Harness):
    spec = harness.job(data_uri(b"<html>not an image</html>"))
    outcome = harness.runner.run(spec)
    record = harness.record(spec)
    assert (
        outcome.kind == "failed" and record.result_code == 422 and record.error_type == "image_load_error"
    ), record


def test_an_overwritten_upload_is_superseded(harness: Harness):
    put(harness.stack, "photo.png", body=png_bytes())
    spec = harness.job(
        f"s3://{harness.settings.input_bucket}/photo.png", source="s3_event", input_etag="0" * 32
    )
    outcome = harness.runner.run(spec)
    record = harness.record(spec)
    assert outcome.kind == "failed" and record.status == "COMPLETED", record
    assert "superseded by a newer upload" in (record.error or "")


# --- cancelled ---------------------------------------------------------------------------------------
def test_cancelled_before_it_runs(harness: Harness):
    spec = harness.job()
    harness.store.redis.hset(keys.job(spec.request_id), "cancel_requested", "1")
    forwards: list[bool] = []
    harness.during_forward.append(lambda: forwards.append(True))
    assert harness.runner.run(spec).kind == "cancelled"
    assert_ended_with(harness, spec, 499, "client_cancelled", "Request was cancelled")
    assert not forwards, "no forward for a job cancelled before it ran"


def test_cancelled_while_it_runs(stack: Stack):
    """With the flag read again before rendering (its last reading is older than cancel_check_interval),
    the run stops there: no outputs are stored."""
    harness = make_harness(stack, cancel_check_interval=0)
    spec = harness.job()
    cancels: list[str] = []
    harness.during_forward.append(lambda: cancels.append(harness.store.cancel(spec.request_id)))
    assert harness.runner.run(spec).kind == "cancelled"
    assert cancels == ["requested"]
    assert_ended_with(harness, spec, 499, "client_cancelled", "Request was cancelled")
    assert (
        not s3_client(harness.settings)
        .list_objects_v2(Bucket=harness.settings.output_bucket, Prefix=spec.output_prefix + "cutout")
        .get("Contents")
    )


def test_a_cancel_soon_after_the_claim_is_recorded_by_the_completion(harness: Harness):
    """Within cancel_check_interval of the claim the flag is not read again: the job runs to its end, and
    its completion records fal's cancelled outcome instead of the result (one completion, one webhook)."""
    assert harness.settings.cancel_check_interval >= 1.0
    spec = harness.job(webhook_url="http://127.0.0.1:9/hook")
    cancels: list[str] = []
    harness.during_forward.append(lambda: cancels.append(harness.store.cancel(spec.request_id)))
    reads: list[str] = []
    read_flag = harness.store.cancel_requested
    harness.store.cancel_requested = lambda rid: reads.append(rid) or read_flag(rid)  # type: ignore[method-assign]
    assert harness.runner.run(spec).kind == "cancelled"
    assert cancels == ["requested"]
    assert_ended_with(harness, spec, 499, "client_cancelled", "Request was cancelled")
    cancelled_body = {"detail": "Request was cancelled", "error_type": "client_cancelled"}
    assert harness.record(spec).result == cancelled_body
    document = harness.runner.objects.read_json(
        harness.settings.output_bucket, spec.output_prefix + RESULT_DOCUMENT
    )
    assert document == cancelled_body, "the result document says what the record says"
    [entry] = completions_of(harness, spec)
    assert (entry["outcome"], entry["error_type"]) == ("cancelled", "client_cancelled")
    assert harness.store.redis.zscore(keys.WEBHOOK_DUE, f"{spec.request_id}|0") is not None, "its webhook"
    assert harness.store.redis.zscore(keys.running(VARIANT), spec.request_id) is None
    assert reads == [], "no read of the cancel flag before rendering"


# --- lease lost ---------------------------------------------------------------------------------------
def test_a_lost_lease_discards_the_outcome(harness: Harness):
    spec = harness.job()

    def taken_elsewhere() -> None:  # our lease lapses (a pause past it), and another worker claims the job
        harness.store.redis.zadd(keys.running(VARIANT), {spec.request_id: 0}, xx=True)
        claim = harness.store.claim(
            spec.request_id, VARIANT, "another-worker", lease_seconds=60, max_attempts=3, worker="other"
        )
        assert claim.outcome == "claimed"

    harness.during_forward.append(taken_elsewhere)
    outcome = harness.runner.run(spec)
    assert outcome.kind == "done"
    record = harness.record(spec)
    assert record.status == "IN_PROGRESS" and record.result is None, (
        "the lease holder's job, not completed by us"
    )
    assert harness.store.redis.zscore(keys.running(VARIANT), spec.request_id) is not None, (
        "still running for ops: the lease holder runs it"
    )
    assert completions_of(harness, spec) == [], "no completion recorded for an outcome discarded"


# --- retried ------------------------------------------------------------------------------------------
def test_a_forward_past_the_time_limit_retries_and_trips_the_worker(stack: Stack):
    harness = make_harness(stack, job_time_limit=0.5)
    harness.during_forward.append(lambda: time.sleep(1.5))
    spec = harness.job()
    outcome = harness.runner.run(spec)
    assert outcome.kind == "retry" and "run-time limit" in outcome.detail
    fields = harness.store.redis.hgetall(keys.job(spec.request_id))
    assert fields["status"] == "IN_QUEUE" and fields["last_error_type"] == TIMEOUT_ERROR_TYPE
    assert harness.attempts(spec) == 1, "the attempt counts"
    assert harness.runner.health.tripped, "a forward that does not come back makes the worker stuck"
    assert harness.runner.run(harness.job()).kind == "handback"


def test_a_limit_passed_before_the_forward_retries_without_tripping(stack: Stack):
    harness = make_harness(stack, job_time_limit=0.0)
    spec = harness.job()
    outcome = harness.runner.run(spec)
    assert outcome.kind == "retry" and "during the download and decode" in outcome.detail
    assert harness.record(spec).status == "IN_QUEUE" and harness.attempts(spec) == 1
    assert not harness.runner.health.tripped


def test_a_stuck_batcher_hands_the_job_to_another_worker(harness: Harness):
    harness.runner.batchers[VARIANT].declare_stuck("test")
    spec = harness.job()
    outcome = harness.runner.run(spec)
    assert outcome.kind == "handback"
    assert harness.record(spec).status == "IN_QUEUE" and harness.attempts(spec) == 0, (
        "the attempt is refunded"
    )
    assert "handed to another worker" in " ".join(e["message"] for e in harness.store.logs(spec.request_id))
    assert harness.store.redis.zscore(keys.running(VARIANT), spec.request_id) is None, "no longer running"
    assert completions_of(harness, spec) == []


def test_an_s3_outage_retries_with_the_attempt_refunded(harness: Harness):
    put(harness.stack, "photo.png", body=png_bytes())
    down = harness.settings.model_copy(update={"s3_endpoint_url": "http://127.0.0.1:1"})
    harness.runner.objects = ObjectStore(down)
    spec = harness.job(f"s3://{harness.settings.input_bucket}/photo.png")
    outcome = harness.runner.run(spec)
    assert outcome.kind == "retry" and outcome.detail.startswith("transient:")
    assert harness.record(spec).status == "IN_QUEUE" and harness.attempts(spec) == 0


def test_an_unexpected_error_retries_and_is_recorded(harness: Harness, monkeypatch: pytest.MonkeyPatch):
    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(harness.runner.masks, "obtain", boom)
    spec = harness.job()
    outcome = harness.runner.run(spec)
    assert (outcome.kind, outcome.detail) == ("retry", "RuntimeError: boom")
    fields = harness.store.redis.hgetall(keys.job(spec.request_id))
    assert fields["status"] == "IN_QUEUE" and fields["last_error"] == "RuntimeError: boom"
    assert harness.attempts(spec) == 1, "the attempt counts"


# --- a video in segments -------------------------------------------------------------------------------
def test_a_segment_whose_parts_are_not_in_the_output_bucket_is_encoded_again(stack: Stack, tmp_path):
    """A segment run by a worker whose output bucket is another (two deployments on one Redis database)
    stored its parts there: the worker joining the video encodes it again, where the join used to leave
    its frames out (5 of 8) while the result said 8."""
    joining = make_harness(stack, video_segment_seconds=0.4)
    elsewhere = f"{stack.settings.output_bucket}-elsewhere"
    s3 = s3_client(stack.settings)
    s3.create_bucket(Bucket=elsewhere)
    other = make_harness(stack, video_segment_seconds=0.4, output_bucket=elsewhere)
    clip = make_clip(str(tmp_path / "clip.mp4"), width=64, height=48, seconds=1.0, fps=8)
    with open(clip, "rb") as fh:
        video_url = data_uri(fh.read(), "video/mp4")
    spec = joining.job(
        image_url=video_url,
        params=JobParams(output_mask=True),
        extra={"video": VideoOptions(output_type="VP9 (.webm)").model_dump()},
    )
    # 3 segments of 1/3 s (3, 3 and 2 frames); the other worker takes the second first.
    second = segment_specs(spec, 3, 1.0)[1]
    assert other.store.create(second)
    assert other.runner.run(second).kind == "done"
    assert other.record(second).result == {"frames": 3}

    assert joining.runner.run(spec).kind == "done"
    record = joining.record(spec)
    assert record.ok and record.result["video"]["num_frames"] == 8, record.result
    source = read_video(clip)
    for name in ("video.webm", "mask.webm"):
        body = s3.get_object(Bucket=joining.settings.output_bucket, Key=spec.output_prefix + name)["Body"]
        (tmp_path / name).write_bytes(body.read())
        out = read_video(str(tmp_path / name))
        assert out["frames"] == 8 and out["times"] == source["times"], (name, out["times"])
    logs = [entry["message"] for entry in joining.store.logs(spec.request_id)]
    assert any(
        line.endswith("segment 2/3: its parts are not in the output bucket; encoding it again")
        for line in logs
    )
