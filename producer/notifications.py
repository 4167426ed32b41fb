"""Object-store event notifications -> the created objects they name, for SQS and HTTP alike: AWS S3
records (and `s3:TestEvent`), the same in an SNS envelope, S3 via EventBridge, MinIO webhooks, Ceph RGW.

Keys: AWS and MinIO form-encode them ("a b+c.png" is "a+b%2Bc.png"), Ceph sends them as they are, so decoding
follows the record's `eventSource`. EventBridge does not document it: its key is read decoded, the raw form
kept as `alt_key`. A malformed record goes to `rejected` (the others still count); only a message that is
not a notification at all raises `MalformedEvent`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from urllib.parse import unquote_plus

RAW_KEY_SOURCES = ("ceph:s3",)  # eventSource values whose keys are not form-encoded
SNS_TYPES = ("Notification", "SubscriptionConfirmation", "UnsubscribeConfirmation")


@dataclass(frozen=True)
class ObjectCreated:
    bucket: str
    key: str
    size: int | None
    etag: str | None
    version_id: str | None
    event_name: str
    sequencer: str | None = None
    source: str = "aws:s3"  # the record's eventSource; "aws.s3" for EventBridge
    alt_key: str | None = None  # another reading of the key, for sources whose encoding is undocumented


@dataclass(frozen=True)
class RejectedRecord:
    index: int
    reason: str


@dataclass
class Notification:
    """What one message holds: created objects, records refused (with why), records of other kinds."""

    kind: str  # "records", "sns", "eventbridge", "test"
    events: list[ObjectCreated] = field(default_factory=list)
    rejected: list[RejectedRecord] = field(default_factory=list)
    other: int = 0  # records that are not object creations (deletes, tagging...): nothing to do


class MalformedEvent(ValueError):
    """The message is not an event notification of any source we take."""


class BadRecord(ValueError):
    """One record of a notification is malformed; the others still count."""


def _text(value: object, what: str, *, required: bool = True) -> str | None:
    if value is None or value == "":
        if required:
            raise BadRecord(f"{what} is missing")
        return None
    if not isinstance(value, str):
        raise BadRecord(f"{what} is a {type(value).__name__}, not a string")
    return value


def _object(value: object, what: str) -> dict:
    if not isinstance(value, dict):
        raise BadRecord(
            f"{what} is {'missing' if value is None else 'a ' + type(value).__name__}, not an object"
        )
    return value


def _size(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and value >= 0:
        return value
    if isinstance(value, str) and value.isdigit():  # Ceph sends the size as a string
        return int(value)
    return None


def _version(value: object) -> str | None:
    # "null" is S3's version id of an object written while versioning was off or suspended: the next such
    # write replaces it, so it pins nothing. Ceph sends "" when unversioned.
    if not isinstance(value, str) or value in ("", "null"):
        return None
    return value


def _etag(value: object) -> str | None:
    if not isinstance(value, str):
        return None
    return value.strip().strip('"') or None


def _decode_key(raw: str, source: str) -> str:
    if source in RAW_KEY_SOURCES:
        return raw
    try:
        return unquote_plus(raw, errors="strict")
    except UnicodeDecodeError as exc:
        raise BadRecord(f"object key {raw[:200]!r} is not valid URL-encoded UTF-8") from exc


def parse_record(record: object) -> ObjectCreated | None:
    """One `Records` entry: the created object, None for other event types; raises BadRecord."""
    record = _object(record, "the record")
    name = _text(record.get("eventName"), "eventName")
    assert name is not None
    if not name.removeprefix("s3:").startswith("ObjectCreated:"):
        return None
    source = _text(record.get("eventSource"), "eventSource", required=False) or "aws:s3"
    s3 = _object(record.get("s3"), "s3")
    bucket = _object(s3.get("bucket"), "s3.bucket")
    obj = _object(s3.get("object"), "s3.object")
    bucket_name = _text(bucket.get("name"), "s3.bucket.name")
    raw_key = _text(obj.get("key"), "s3.object.key")
    assert bucket_name is not None and raw_key is not None
    key = _decode_key(raw_key, source)
    if not key:
        raise BadRecord("s3.object.key is empty once decoded")
    return ObjectCreated(
        bucket=bucket_name,
        key=key,
        size=_size(obj.get("size")),
        etag=_etag(obj.get("eTag") or obj.get("etag")),
        version_id=_version(obj.get("versionId")),
        event_name=name,
        sequencer=_text(obj.get("sequencer"), "s3.object.sequencer", required=False),
        source=source,
    )


def parse_eventbridge(event: dict) -> Notification:
    """An S3 event routed through EventBridge (one object per event)."""
    note = Notification(kind="eventbridge")
    if event.get("source") != "aws.s3":
        raise MalformedEvent(f"EventBridge event from {str(event.get('source'))[:100]!r}, not aws.s3")
    if event.get("detail-type") != "Object Created":
        note.other = 1
        return note
    try:
        detail = _object(event.get("detail"), "detail")
        bucket = _text(_object(detail.get("bucket"), "detail.bucket").get("name"), "detail.bucket.name")
        obj = _object(detail.get("object"), "detail.object")
        raw_key = _text(obj.get("key"), "detail.object.key")
        assert bucket is not None and raw_key is not None
        key = _decode_key(raw_key, "aws:s3")
        reason = detail.get("reason")
        note.events.append(
            ObjectCreated(
                bucket=bucket,
                key=key or raw_key,
                size=_size(obj.get("size")),
                etag=_etag(obj.get("etag") or obj.get("eTag")),
                version_id=_version(obj.get("version-id")),
                event_name=f"ObjectCreated:{reason if isinstance(reason, str) else 'Put'}",
                sequencer=_text(obj.get("sequencer"), "detail.object.sequencer", required=False),
                source="aws.s3",
                alt_key=raw_key if key != raw_key else None,
            )
        )
    except BadRecord as exc:
        note.rejected.append(RejectedRecord(0, str(exc)))
    return note


def _load(body: str | bytes | dict) -> dict:
    if isinstance(body, str | bytes):
        try:
            body = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise MalformedEvent(f"not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise MalformedEvent(f"notification is a JSON {type(body).__name__}, not an object")
    return body


def parse_notification(body: str | bytes | dict, _depth: int = 0) -> Notification:
    """Every created object one message names, with the records refused and why.

    Raises MalformedEvent only when the message as a whole is not a notification."""
    body = _load(body)
    if body.get("Type") in SNS_TYPES and "TopicArn" in body:  # SNS envelope (SNS -> SQS, or SNS -> HTTP)
        if _depth:
            raise MalformedEvent("an SNS envelope inside an SNS envelope")
        if body["Type"] != "Notification":
            raise MalformedEvent(f"SNS {body['Type']} is not a notification")
        message = body.get("Message")
        if not isinstance(message, str):
            raise MalformedEvent("SNS notification without a Message string")
        inner = parse_notification(message, _depth + 1)
        inner.kind = f"sns+{inner.kind}"
        return inner
    if body.get("Event") == "s3:TestEvent":
        return Notification(kind="test")
    if "detail-type" in body and "detail" in body:
        return parse_eventbridge(body)
    records = body.get("Records")
    if not isinstance(records, list):
        raise MalformedEvent("no Records list in the notification")
    note = Notification(kind="records")
    for index, record in enumerate(records):
        try:
            created = parse_record(record)
        except BadRecord as exc:
            note.rejected.append(RejectedRecord(index, str(exc)))
            continue
        except Exception as exc:  # a record shape nobody foresaw: refuse it, keep the others
            note.rejected.append(RejectedRecord(index, f"unreadable record ({type(exc).__name__}: {exc})"))
            continue
        if created is None:
            note.other += 1
        else:
            note.events.append(created)
    return note
