"""The producer against real moto S3+SQS and a real redis-server (no worker needed)."""

from __future__ import annotations

from common.adapters.storage import make_sqs_client
from common.settings import Settings
from common.state.jobs import JobStore
from devstack.services import RedisServer
from producer.intake import build_intake
from producer.sqs import SqsConsumer
from tests.helpers.pipeline import put, queue_is_empty, queued_specs
from tests.helpers.stack import Stack


def consumer(settings: Settings) -> SqsConsumer:
    return SqsConsumer(
        make_sqs_client(settings), settings.sqs_queue_url, build_intake(settings), wait_seconds=1
    )


def drain(c: SqsConsumer, rounds: int = 3) -> int:
    return sum(c.poll_once() for _ in range(rounds))


def test_upload_becomes_one_job_with_metadata_params(stack: Stack):
    settings = stack.settings.model_copy(
        update={"prefix_defaults": {"portraits/": {"output_format": "webp", "model": "Portrait"}}}
    )
    c = consumer(settings)
    put(stack, "portraits/me and you.jpg", {"output_mask": "true", "model": "General Use (Heavy)"})
    put(stack, "notes/readme.txt")  # not an image key: ignored, message still consumed
    drain(c)
    assert queue_is_empty(stack.settings), (
        "every message, the test event and the .txt one included, is consumed"
    )
    (spec,) = queued_specs(stack, "birefnet.general-heavy")
    assert spec["image_url"] == f"s3://{stack.settings.input_bucket}/portraits/me and you.jpg"
    assert spec["params"]["output_mask"] is True and spec["params"]["output_format"] == "webp"
    assert spec["variant"] == "general-heavy" and spec["source"] == "s3_event"
    assert spec["output_prefix"].startswith(
        f"{stack.settings.output_prefix}uploads/portraits/me and you.jpg/"
    )
    store = JobStore.from_url(stack.settings.redis_url)
    record = store.get(spec["request_id"])
    assert record.status == "IN_QUEUE" and store.queue_position(spec["request_id"], "general-heavy") == 0


def test_redelivered_event_does_not_make_a_second_job(stack: Stack):
    c = consumer(stack.settings)
    put(stack, "a.png")
    sqs = make_sqs_client(stack.settings)
    messages = sqs.receive_message(
        QueueUrl=stack.settings.sqs_queue_url, WaitTimeSeconds=2, MaxNumberOfMessages=10
    )["Messages"]
    (message,) = [m for m in messages if "a.png" in m["Body"]]
    assert c.handle_message(message["Body"]) and c.handle_message(message["Body"])
    ids = {s["request_id"] for s in queued_specs(stack, "birefnet.general-light")}
    assert len(ids) == 1, "both deliveries name the same job"


def test_message_is_kept_while_redis_is_down(stack: Stack, redis_server: RedisServer):
    down = stack.settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    c = consumer(down)
    put(stack, "b.png")
    drain(c, rounds=2)
    assert not queue_is_empty(stack.settings), "nothing is deleted while jobs cannot be enqueued"
    # Once Redis is reachable the same message is handled (it reappears after its visibility timeout).
    sqs = make_sqs_client(stack.settings)
    attrs = sqs.get_queue_attributes(
        QueueUrl=stack.settings.sqs_queue_url, AttributeNames=["ApproximateNumberOfMessagesNotVisible"]
    )["Attributes"]
    assert int(attrs["ApproximateNumberOfMessagesNotVisible"]) >= 1
