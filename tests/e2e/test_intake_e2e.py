"""Bucket intake end to end with real processes: moto's S3/SQS/SNS/EventBridge server, the real producer
(`python -m producer sqs`), a real worker, webhooks to a real receiver. Event bodies the tests send
themselves are the providers' documented payloads (tests/helpers/event_payloads.py names each source)."""

from __future__ import annotations

import io
import json

import boto3
import httpx
import numpy as np
import pytest
import redis
from PIL import Image
from skimage import data as samples

from common.adapters.queue import make_celery
from common.adapters.storage import boto_config
from common.state import ops_state
from common.state.jobs import JobStore
from devstack.receiver import WebhookReceiver
from ops import control
from tests.helpers import event_payloads as docs
from tests.helpers.images import array_png
from tests.helpers.stack import Stack, wait_for

FAST = {"BIREFNET_TEST_OPERATING_RESOLUTION": "128x128"}  # CPU: small forward passes, logged as test mode


def client(stack: Stack, service: str):
    url = stack.settings.s3_endpoint_url
    return boto3.client(
        service, region_name=stack.settings.aws_region, endpoint_url=url, config=boto_config()
    )


def picture(source: np.ndarray, width: int, height: int) -> bytes:
    return array_png(np.asarray(Image.fromarray(source).resize((width, height))))


def fetch_image(url: str) -> Image.Image:
    response = httpx.get(url)
    response.raise_for_status()
    return Image.open(io.BytesIO(response.content))


def job_records(stack: Stack) -> dict[str, object]:
    store = JobStore.from_url(stack.settings.redis_url)
    ids = [k.split(":")[-1] for k in store.redis.scan_iter("birefnet:job:*") if not k.endswith(":logs")]
    return {rid: store.get(rid) for rid in ids}


def queue_counts(sqs, url: str) -> int:
    attrs = sqs.get_queue_attributes(
        QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
    )["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"]) + int(attrs["ApproximateNumberOfMessagesNotVisible"])


def by_request(deliveries) -> dict[str, dict]:
    return {d.json()["request_id"]: d.json() for d in deliveries}


def routes(stack: Stack) -> dict[str, str]:
    """Buckets whose uploads reach the event queue by moto's own delivery: S3 -> EventBridge -> SQS,
    S3 -> SNS -> SQS (envelope) and S3 -> SNS -> SQS (raw delivery); plus one no route reaches."""
    settings = stack.settings
    s3, sqs, sns, events = (client(stack, s) for s in ("s3", "sqs", "sns", "events"))
    queue_arn = sqs.get_queue_attributes(QueueUrl=settings.sqs_queue_url, AttributeNames=["QueueArn"])[
        "Attributes"
    ]["QueueArn"]
    suffix = settings.input_bucket.removeprefix("in-")
    buckets = {p: f"{p}-{suffix}" for p in ("eventbridge", "sns", "raw", "stray")}
    for bucket in buckets.values():
        s3.create_bucket(Bucket=bucket)
    eb = buckets["eventbridge"]
    s3.put_bucket_notification_configuration(
        Bucket=eb, NotificationConfiguration={"EventBridgeConfiguration": {}}
    )
    events.put_rule(
        Name=f"uploads-{suffix}",
        EventPattern=json.dumps(
            {"source": ["aws.s3"], "detail-type": ["Object Created"], "detail": {"bucket": {"name": [eb]}}}
        ),
    )
    events.put_targets(Rule=f"uploads-{suffix}", Targets=[{"Id": "queue", "Arn": queue_arn}])
    for bucket, raw_delivery in ((buckets["sns"], "false"), (buckets["raw"], "true")):
        topic = sns.create_topic(Name=f"t-{bucket}")["TopicArn"]
        sns.subscribe(
            TopicArn=topic,
            Protocol="sqs",
            Endpoint=queue_arn,
            Attributes={"RawMessageDelivery": raw_delivery},
        )
        s3.put_bucket_notification_configuration(
            Bucket=bucket,
            NotificationConfiguration={
                "TopicConfigurations": [{"TopicArn": topic, "Events": ["s3:ObjectCreated:*"]}]
            },
        )
    return buckets


@pytest.mark.timeout(480)
def test_sqs_routes_versions_duplicates_and_bad_records(stack: Stack, webhook_receiver: WebhookReceiver):
    """Over SQS, one producer and one worker:
    - two versions of one key whose events both arrive after the second upload, out of order, one of them
      delivered twice, with malformed records between good ones: each version is cut from its own bytes,
      one result and one webhook each, every message deleted, nothing in the dead-letter queue;
    - S3 -> EventBridge -> SQS and S3 -> SNS -> SQS (envelope and raw), delivered by moto, and a documented
      EventBridge event for a versioned object: keys with '+', spaces, '%', unicode arrive intact;
    - events for a bucket outside the allow-list and for the output bucket are ignored, the log says why."""
    settings = stack.settings
    s3, sqs = client(stack, "s3"), client(stack, "sqs")
    bucket, key = settings.input_bucket, "shots/c++ notes 1 ünï%2F.png"
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    s3.put_bucket_notification_configuration(
        Bucket=bucket, NotificationConfiguration={}
    )  # we send the events
    dlq_url = sqs.create_queue(QueueName=f"dlq-{bucket}")["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    sqs.set_queue_attributes(
        QueueUrl=settings.sqs_queue_url,
        Attributes={
            "VisibilityTimeout": "10",
            "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "2"}),
        },
    )
    buckets = routes(stack)

    meta = {"webhook_url": webhook_receiver.url, "refine_foreground": "false"}
    sizes = {"v1": (96, 72), "v2": (64, 112)}
    sources = {"v1": samples.astronaut(), "v2": samples.chelsea()}
    uploads = {}
    for name in ("v1", "v2"):
        put = s3.put_object(
            Bucket=bucket,
            Key=key,
            Body=picture(sources[name], *sizes[name]),
            Metadata=meta,
            ContentType="image/png",
        )
        uploads[name] = (put["VersionId"], put["ETag"].strip('"'))
    other_key = "other/plus+and space.png"
    other = s3.put_object(Bucket=bucket, Key=other_key, Body=picture(samples.coffee(), 80, 60), Metadata=meta)

    def record(name: str, sequencer: str) -> dict:
        version_id, etag = uploads[name]
        return docs.aws_record(bucket, key, etag=etag, version_id=version_id, sequencer=sequencer)

    other_record = docs.aws_record(
        bucket, other_key, etag=other["ETag"].strip('"'), version_id=other["VersionId"]
    )
    bad_key = docs.aws_record(bucket, "x.png", etag="e")
    bad_key["s3"]["object"]["key"] = 12
    batch = {
        "Records": [
            None,
            record("v1", "0A"),
            {"eventName": "ObjectCreated:Put", "s3": "nope"},
            other_record,
            bad_key,
            7,
        ]
    }
    for body in (
        docs.aws_notification(record("v2", "0B")),
        batch,  # v2's event first
        docs.aws_notification(record("v1", "0A")),  # v1 delivered a second time
        "this is not an event notification",
    ):
        sqs.send_message(
            QueueUrl=settings.sqs_queue_url, MessageBody=body if isinstance(body, str) else json.dumps(body)
        )

    route_keys = {
        buckets["eventbridge"]: "bridge/c++ notes 1.png",
        buckets["sns"]: "sns/100% ünï 猫.png",
        buckets["raw"]: "raw/a%2Fb plus+.png",
    }
    route_sizes = dict(zip(route_keys, ((64, 48), (40, 72), (56, 56)), strict=True))
    for route_bucket, route_key in route_keys.items():
        s3.put_object(
            Bucket=route_bucket,
            Key=route_key,
            Body=picture(samples.astronaut(), *route_sizes[route_bucket]),
            Metadata=meta,
        )
    documented_key = "documented/Object Created.png"
    documented = s3.put_object(
        Bucket=bucket, Key=documented_key, Body=picture(samples.coffee(), 50, 30), Metadata=meta
    )
    sqs.send_message(
        QueueUrl=settings.sqs_queue_url,
        MessageBody=json.dumps(
            docs.eventbridge_object_created(
                bucket, documented_key, etag=documented["ETag"].strip('"'), version_id=documented["VersionId"]
            )
        ),
    )
    s3.put_object(Bucket=buckets["stray"], Key="misrouted.png", Body=b"x")  # no route: its event sent by hand
    for ignored in (buckets["stray"], settings.output_bucket):
        sqs.send_message(
            QueueUrl=settings.sqs_queue_url,
            MessageBody=json.dumps(
                docs.aws_notification(docs.aws_record(ignored, "misrouted.png", etag="e"))
            ),
        )

    allowed = ",".join((bucket, buckets["eventbridge"], buckets["sns"], buckets["raw"]))
    stack.start(["-m", "producer", "sqs"], "producer", {"BIREFNET_INPUT_BUCKETS": allowed})
    stack.start(["-m", "deliverer", "--concurrency", "2"], "webhooks")
    stack.start_worker("general-light", extra_env=FAST)

    deliveries = by_request(webhook_receiver.wait(7, timeout=360))
    wait_for(lambda: queue_counts(sqs, settings.sqs_queue_url) == 0, 90, "every message deleted")
    records = job_records(stack)
    assert len(records) == 7, sorted(r.spec.image_url for r in records.values())
    assert all(r.status == "COMPLETED" and r.ok for r in records.values()), [
        r.error for r in records.values()
    ]
    assert set(deliveries) == set(records) and len(webhook_receiver.received) == 7, "one webhook per upload"
    assert all(body["status"] == "OK" for body in deliveries.values())
    found = {r.spec.image_url: (r, deliveries[rid]["payload"]["image"]) for rid, r in records.items()}

    for name, (version_id, _) in uploads.items():  # each version from its own bytes
        record_, image = found[f"s3://{bucket}/{key}?versionId={version_id}"]
        assert record_.spec.input_version == version_id
        assert (image["width"], image["height"]) == sizes[name], name
        want = np.asarray(Image.open(io.BytesIO(picture(sources[name], *sizes[name]))).convert("RGB"))
        assert np.array_equal(np.asarray(fetch_image(image["url"]).convert("RGBA"))[..., :3], want), name
    assert f"s3://{bucket}/{other_key}?versionId={other['VersionId']}" in found
    for route_bucket, route_key in route_keys.items():
        _, image = found[f"s3://{route_bucket}/{route_key}"]
        assert (image["width"], image["height"]) == route_sizes[route_bucket], route_key
    _, image = found[f"s3://{bucket}/{documented_key}?versionId={documented['VersionId']}"]
    assert (image["width"], image["height"]) == (50, 30)

    assert queue_counts(sqs, dlq_url) == 0, "nothing reached the dead-letter queue"
    log = stack.tail("producer", 600)
    assert "record 0 skipped: the record is missing, not an object" in log
    assert "record 2 skipped: s3 is a str, not an object" in log and "record 4 skipped" in log
    assert "dropped: not an event notification" in log
    assert f"bucket '{buckets['stray']}' is not an input bucket" in log
    assert f"it is in the output bucket '{settings.output_bucket}'" in log


@pytest.mark.timeout(420)
def test_overwrite_while_paused_supersedes_the_first_job(stack: Stack, webhook_receiver: WebhookReceiver):
    """Unversioned bucket (moto's own S3 -> SQS events): the first upload's job waits on a paused variant,
    the key is overwritten, then the variant resumes. The first job ends "superseded by a newer upload",
    the second is cut from the new bytes."""
    settings = stack.settings
    s3 = client(stack, "s3")
    r = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    ops_state.set_paused(r, "general-light", "test")
    stack.start(["-m", "producer", "sqs"], "producer")
    stack.start(["-m", "deliverer", "--concurrency", "2"], "webhooks")
    stack.start_worker("general-light", name="worker", extra_env=FAST)
    wait_for(
        lambda: "is paused" in stack.tail("worker", 200), 60, "the worker to leave its paused queue alone"
    )

    meta = {"webhook_url": webhook_receiver.url}
    key = "portraits/me + you.png"
    s3.put_object(
        Bucket=settings.input_bucket, Key=key, Body=picture(samples.astronaut(), 90, 90), Metadata=meta
    )
    wait_for(lambda: len(job_records(stack)) == 1, 60, "the first upload's job")
    s3.put_object(
        Bucket=settings.input_bucket, Key=key, Body=picture(samples.chelsea(), 70, 50), Metadata=meta
    )
    wait_for(lambda: len(job_records(stack)) == 2, 60, "the second upload's job")
    assert all(rec.status == "IN_QUEUE" for rec in job_records(stack).values())
    control.resume(r, make_celery(settings), settings, "general-light")

    deliveries = webhook_receiver.wait(2, timeout=300)
    by_status = {d.json()["status"]: d.json() for d in deliveries}
    assert set(by_status) == {"OK", "ERROR"}, [d.json() for d in deliveries]
    (detail,) = by_status["ERROR"]["payload"]["detail"]
    assert detail["type"] == "file_download_error" and "superseded by a newer upload" in detail["msg"]
    image = by_status["OK"]["payload"]["image"]
    assert (image["width"], image["height"]) == (70, 50)
    records = job_records(stack)
    failed = records[by_status["ERROR"]["request_id"]]
    assert failed.spec.input_etag and failed.spec.image_url == f"s3://{settings.input_bucket}/{key}"
