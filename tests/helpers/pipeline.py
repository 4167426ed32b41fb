"""The S3-event pipeline from outside: uploads, the event queue and the Celery queues a stack's producer
fills."""

from __future__ import annotations

import json
from urllib.parse import quote_plus

import boto3
import redis

from common.adapters import broker
from common.adapters.storage import boto_config
from common.settings import Settings
from tests.helpers.stack import Stack


def s3_client(settings: Settings):
    return boto3.client(
        "s3", region_name=settings.aws_region, endpoint_url=settings.s3_endpoint_url, config=boto_config()
    )


def queue_is_empty(settings: Settings) -> bool:
    sqs = boto3.client("sqs", region_name=settings.aws_region, endpoint_url=settings.sqs_endpoint_url)
    attrs = sqs.get_queue_attributes(
        QueueUrl=settings.sqs_queue_url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return (
        attrs["ApproximateNumberOfMessages"] == "0" and attrs["ApproximateNumberOfMessagesNotVisible"] == "0"
    )


def queued_specs(stack: Stack, queue: str) -> list[dict]:
    """Job specs waiting in a Celery queue (a Redis list of kombu envelopes), oldest first."""
    client = redis.Redis.from_url(stack.settings.redis_url)
    return [broker.decode(m).spec for m in reversed(client.lrange(queue, 0, -1))]


def put(stack: Stack, key: str, metadata: dict | None = None, body: bytes = b"img") -> str:
    """Upload to the input bucket; returns the object's ETag (as events carry it)."""
    s3 = boto3.client(
        "s3",
        region_name=stack.settings.aws_region,
        endpoint_url=stack.settings.s3_endpoint_url,
        config=boto_config(),
    )
    return s3.put_object(Bucket=stack.settings.input_bucket, Key=key, Body=body, Metadata=metadata or {})[
        "ETag"
    ].strip('"')


def minio_body(bucket: str, key: str, etag: str | None = None, event: str = "s3:ObjectCreated:Put") -> str:
    """A notification as MinIO's webhook target sends it (keys URL-encoded in the record). Without `etag`
    the record names no ETag and the producer takes the object as it is now."""
    obj = {"key": quote_plus(key, safe="/"), "size": 3, "sequencer": "1", **({"eTag": etag} if etag else {})}
    record = {
        "eventVersion": "2.0",
        "eventSource": "minio:s3",
        "eventName": event,
        "s3": {"bucket": {"name": bucket, "arn": f"arn:aws:s3:::{bucket}"}, "object": obj},
    }
    return json.dumps({"EventName": event, "Key": f"{bucket}/{key}", "Records": [record]})
