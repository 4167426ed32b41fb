"""Event notifications as each provider documents them (tests/helpers/event_payloads.py names the sources)."""

from __future__ import annotations

import json

import pytest

from producer.notifications import MalformedEvent, parse_notification
from tests.helpers import event_payloads as docs

# Keys that break naive decoding: spaces, '+', '%', unicode, an encoded slash, a '?' that is not a query.
HARD_KEYS = [
    "c++ notes 1.png",
    "100% real/ünïcødé 猫.png",
    "a%2Fb/slash%2Fkept.png",
    "what?versionId=x.png",
    "plus+and space .png",
]


def only(note):
    (event,) = note.events
    return event


@pytest.mark.parametrize("key", HARD_KEYS)
def test_every_source_delivers_keys_intact(key):
    bodies = {
        "aws 2.1": docs.aws_notification(docs.aws_record("in", key, etag="e1")),
        "aws 2.2": docs.aws_notification(docs.aws_record("in", key, etag="e1", event_version="2.2")),
        "sns envelope": docs.sns_envelope(docs.aws_notification(docs.aws_record("in", key, etag="e1"))),
        "eventbridge": docs.eventbridge_object_created("in", key, etag="e1"),
        "minio": docs.minio_webhook("in", key, etag="e1"),
        "rustfs": docs.rustfs_webhook("in", key, etag="e1"),
        "ceph": docs.ceph_notification("in", key, etag="e1"),
    }
    for source, body in bodies.items():
        event = only(parse_notification(json.dumps(body)))
        assert event.key == key or (source == "eventbridge" and event.alt_key == key), (source, event)
        assert (event.bucket, event.etag) == ("in", "e1"), source


def test_ceph_keys_are_not_decoded_twice():
    event = only(parse_notification(docs.ceph_notification("in", "c++ notes 1.png", etag="x", size=3)))
    assert event.key == "c++ notes 1.png" and event.source == "ceph:s3" and event.size == 3
    assert event.version_id is None  # Ceph sends "" when unversioned


def test_rustfs_records_carry_their_version_or_none():
    versioned = only(parse_notification(docs.rustfs_webhook("in", "a b+c.png", etag="e", version_id="V7")))
    assert (versioned.key, versioned.version_id, versioned.source) == ("a b+c.png", "V7", "rustfs:s3")
    # RustFS leaves versionId out for an unversioned object (no "" and no "null")
    assert only(parse_notification(docs.rustfs_webhook("in", "a.png", etag="e"))).version_id is None


def test_versions_etags_and_sequencers_are_carried():
    record = docs.aws_record(
        "in",
        "a.png",
        etag='"abc"',
        version_id="3HL4kqtJlcpXroDTDmJ.rmSpXd3dIbrHY",
        sequencer="0A1B2C3D4E5F678901",
    )
    event = only(parse_notification(docs.aws_notification(record)))
    assert (event.version_id, event.etag, event.sequencer) == (
        "3HL4kqtJlcpXroDTDmJ.rmSpXd3dIbrHY",
        "abc",
        "0A1B2C3D4E5F678901",
    )
    bridge = only(
        parse_notification(docs.eventbridge_object_created("in", "k.png", etag="b1", version_id="V1"))
    )
    assert (bridge.version_id, bridge.etag, bridge.sequencer, bridge.source) == (
        "V1",
        "b1",
        "617f08299329d189",
        "aws.s3",
    )
    # "null" is the version id of an unversioned write: it pins nothing
    null = docs.aws_record("in", "a.png", etag="e", version_id="null")
    assert only(parse_notification(docs.aws_notification(null))).version_id is None


def test_test_events_and_other_event_types_yield_nothing():
    assert parse_notification(docs.aws_test_event("in")).kind == "test"
    assert parse_notification(docs.sns_envelope(docs.aws_test_event("in"))).events == []
    deleted = docs.aws_notification(
        docs.aws_record("in", "a.png", etag="e", event_name="ObjectRemoved:Delete")
    )
    assert parse_notification(deleted).events == [] and parse_notification(deleted).other == 1
    bridge = docs.eventbridge_object_created("in", "a.png", etag="e")
    bridge["detail-type"] = "Object Deleted"
    assert parse_notification(bridge).events == []


def test_bad_records_are_isolated_with_reasons():
    good = [docs.aws_record("in", f"good/{n}.png", etag=f"e{n}") for n in range(2)]
    no_key = docs.aws_record("in", "x.png", etag="e")
    no_key["s3"]["object"]["key"] = 7
    bad_utf8 = docs.aws_record("in", "x.png", etag="e")
    bad_utf8["s3"]["object"]["key"] = "%FF%FE.png"
    body = {
        "Records": [
            None,
            good[0],
            {"eventName": "ObjectCreated:Put", "s3": "nope"},
            no_key,
            5,
            bad_utf8,
            {"eventName": ["ObjectCreated:Put"]},
            good[1],
        ]
    }
    note = parse_notification(json.dumps(body))
    assert [e.key for e in note.events] == ["good/0.png", "good/1.png"]
    reasons = {r.index: r.reason for r in note.rejected}
    assert set(reasons) == {0, 2, 3, 4, 5, 6}
    assert "not an object" in reasons[0] and "s3 is a str" in reasons[2] and "key is a int" in reasons[3]
    assert "UTF-8" in reasons[5] and "eventName" in reasons[6]


@pytest.mark.parametrize(
    "body",
    [
        "not json",
        "[1]",
        "null",
        json.dumps({"hello": 1}),
        json.dumps({"Records": 5}),
        json.dumps({"Type": "Notification", "TopicArn": "t", "Message": "{bad"}),
        json.dumps(
            {
                "Type": "Notification",
                "TopicArn": "t",
                "Message": json.dumps({"Type": "Notification", "TopicArn": "t", "Message": "{}"}),
            }
        ),
        json.dumps({"detail-type": "Object Created", "source": "aws.ec2", "detail": {}}),
        b"\xff\xfe",
    ],
)
def test_messages_that_are_not_notifications_are_refused(body):
    with pytest.raises(MalformedEvent):
        parse_notification(body)
