"""S3 event notifications -> (bucket, key) pairs for created objects.

Accepts what AWS delivers to SQS (`{"Records": [...]}`, and its one-off `s3:TestEvent`), the same
wrapped in an SNS envelope, and MinIO webhook bodies (`{"EventName", "Key", "Records"}`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from urllib.parse import unquote_plus


@dataclass(frozen=True)
class ObjectCreated:
    bucket: str
    key: str
    size: int | None
    etag: str | None
    version_id: str | None
    event_name: str


class MalformedEvent(ValueError):
    """The message is not an S3 event notification."""


def parse_notification(body: str | bytes | dict) -> list[ObjectCreated]:
    """All ObjectCreated records of one notification; [] for test events and other event types."""
    if isinstance(body, str | bytes):
        try:
            body = json.loads(body)
        except json.JSONDecodeError as exc:
            raise MalformedEvent(f"not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise MalformedEvent("notification is not a JSON object")
    if body.get("Type") == "Notification" and isinstance(body.get("Message"), str):  # SNS envelope
        return parse_notification(body["Message"])
    if body.get("Event") == "s3:TestEvent":
        return []
    records = body.get("Records")
    if not isinstance(records, list):
        raise MalformedEvent("no Records in notification")
    created = []
    for record in records:
        name = str(record.get("eventName", ""))
        if not name.removeprefix("s3:").startswith("ObjectCreated:"):
            continue
        s3 = record.get("s3") or {}
        obj = s3.get("object") or {}
        bucket = (s3.get("bucket") or {}).get("name")
        key = obj.get("key")
        if not bucket or not key:
            raise MalformedEvent("ObjectCreated record without bucket or key")
        created.append(ObjectCreated(
            bucket=bucket,
            key=unquote_plus(key),  # S3 URL-encodes keys in events ("a+b.jpg" is "a b.jpg")
            size=obj.get("size"),
            etag=obj.get("eTag") or obj.get("etag"),
            version_id=obj.get("versionId"),
            event_name=name,
        ))
    return created
