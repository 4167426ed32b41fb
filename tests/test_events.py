"""S3 event notifications as AWS, moto and MinIO deliver them."""

from __future__ import annotations

import json

import pytest

from producer.events import MalformedEvent, parse_notification


def record(name: str, key: str, bucket: str = "in") -> dict:
    return {"eventName": name, "s3": {"bucket": {"name": bucket}, "object": {"key": key, "size": 3, "eTag": "e"}}}


def test_keys_are_url_decoded():
    (event,) = parse_notification(json.dumps({"Records": [record("ObjectCreated:Put", "photos/my+cat%2B1.jpg")]}))
    assert event.key == "photos/my cat+1.jpg" and event.bucket == "in" and event.etag == "e"


def test_test_event_and_other_event_types_yield_nothing():
    assert parse_notification({"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": "in"}) == []
    assert parse_notification({"Records": [record("ObjectRemoved:Delete", "a.jpg")]}) == []


def test_multipart_and_minio_and_sns_forms():
    multipart = {"Records": [record("ObjectCreated:CompleteMultipartUpload", "big.png")]}
    assert [e.key for e in parse_notification(multipart)] == ["big.png"]
    minio = {"EventName": "s3:ObjectCreated:Put", "Key": "in/a.png", "Records": [record("s3:ObjectCreated:Put", "a.png")]}
    assert [e.key for e in parse_notification(minio)] == ["a.png"]
    sns = {"Type": "Notification", "Message": json.dumps(multipart)}
    assert [e.key for e in parse_notification(sns)] == ["big.png"]


@pytest.mark.parametrize("body", ["not json", "[1]", json.dumps({"hello": 1}),
                                  json.dumps({"Records": [{"eventName": "ObjectCreated:Put", "s3": {}}]})])
def test_malformed_messages_are_refused(body):
    with pytest.raises(MalformedEvent):
        parse_notification(body)
