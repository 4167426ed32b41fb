"""Event payloads as each provider documents them, with the object's values filled in.

Every builder keeps the documented shape and field names of its source (named above it) and changes only
the values that identify the object (bucket, key, size, ETag, version, sequencer), encoding the key the
way that source does.
"""

from __future__ import annotations

import json
import uuid
from urllib.parse import quote_plus


def aws_record(
    bucket: str,
    key: str,
    *,
    etag: str,
    size: int = 1024,
    version_id: str | None = None,
    sequencer: str = "0055AED6DCD90281E5",
    event_version: str = "2.1",
    event_name: str = "ObjectCreated:Put",
) -> dict:
    """One record of an S3 event notification.

    Source: "Event message structure", Amazon S3 User Guide,
    https://docs.aws.amazon.com/AmazonS3/latest/userguide/notification-content-structure.html
    (versions 2.1 and 2.2 share this shape; the key is URL-encoded, "red flower.jpg" is "red+flower.jpg").
    """
    obj = {"key": quote_plus(key, safe="/"), "size": size, "eTag": etag, "sequencer": sequencer}
    if version_id is not None:
        obj["versionId"] = version_id
    return {
        "eventVersion": event_version,
        "eventSource": "aws:s3",
        "awsRegion": "us-west-2",
        "eventTime": "1970-01-01T00:00:00.000Z",
        "eventName": event_name,
        "userIdentity": {"principalId": "AWS:AIDAJDPLRKLG7UEXAMPLE"},
        "requestParameters": {"sourceIPAddress": "127.0.0.1"},
        "responseElements": {
            "x-amz-request-id": "C3D13FE58DE4C810",
            "x-amz-id-2": "FMyUVURIY8/IgAtTv8xRjskZQpcIZ9KG4V5Wp6S7S/JRWeUWerMUE5JgHvANOjpD",
        },
        "s3": {
            "s3SchemaVersion": "1.0",
            "configurationId": "testConfigRule",
            "bucket": {
                "name": bucket,
                "ownerIdentity": {"principalId": "A3NL1KOZZKExample"},
                "arn": f"arn:aws:s3:::{bucket}",
            },
            "object": obj,
        },
    }


def aws_notification(*records: dict) -> dict:
    return {"Records": list(records)}


def aws_test_event(bucket: str) -> dict:
    """Sent once when a notification is configured. Source: the same S3 User Guide page
    (notification-content-structure.html, "test message")."""
    return {
        "Service": "Amazon S3",
        "Event": "s3:TestEvent",
        "Time": "2014-10-13T15:57:02.089Z",
        "Bucket": bucket,
        "RequestId": "5582815E1AEA5ADF",
        "HostId": "8cLeGAmw098X5cv4Zkwcmo8vvZa3eH3eKxsPzbB9wrR+YstdA6Knx4Ip8EXAMPLE",
    }


def sns_envelope(
    message: dict | str,
    topic_arn: str = "arn:aws:sns:us-west-2:123456789012:MyTopic",
    subject: str | None = "Amazon S3 Notification",
) -> dict:
    """An SNS notification as SNS delivers it to SQS (non-raw) and to HTTP(S) endpoints.

    Source: "Amazon SNS message and JSON formats" / "HTTP/HTTPS notification JSON format",
    https://docs.aws.amazon.com/sns/latest/dg/http-notification-json.html
    The signature fields are the documentation's placeholders: SQS deliveries are not checked; HTTP ones
    are signed by tests.helpers.sns_fixture.
    """
    envelope = {
        "Type": "Notification",
        "MessageId": str(uuid.uuid4()),
        "TopicArn": topic_arn,
        "Message": message if isinstance(message, str) else json.dumps(message),
        "Timestamp": "2012-05-02T00:54:06.655Z",
        "SignatureVersion": "1",
        "Signature": "EXAMPLEw6JRN",
        "SigningCertURL": "https://sns.us-west-2.amazonaws.com/SimpleNotificationService-f3ecfb7224c7233fe7bb5f59f96de52f.pem",
        "UnsubscribeURL": "https://sns.us-west-2.amazonaws.com/?Action=Unsubscribe&SubscriptionArn="
        f"{topic_arn}:c9135db0-26c4-47ec-8998-413945fb5a96",
    }
    if subject is not None:
        envelope["Subject"] = subject
    return envelope


def sns_subscription_confirmation(topic_arn: str, subscribe_url: str, token: str) -> dict:
    """Source: "HTTP/HTTPS subscription confirmation JSON format",
    https://docs.aws.amazon.com/sns/latest/dg/http-subscription-confirmation-json.html"""
    return {
        "Type": "SubscriptionConfirmation",
        "MessageId": "165545c9-2a5c-472c-8df2-7ff2be2b3b1b",
        "Token": token,
        "TopicArn": topic_arn,
        "Message": f"You have chosen to subscribe to the topic {topic_arn}.\nTo confirm the subscription, "
        "visit the SubscribeURL included in this message.",
        "SubscribeURL": subscribe_url,
        "Timestamp": "2012-04-26T20:45:04.751Z",
        "SignatureVersion": "1",
        "Signature": (
            "EXAMPLEpH+DcEwjAPg8O9mY8dReBSwksfg2S7WKQcikcNKWLQjwu6A4VbeS0QHVCkhRS7fUQvi2egU3N858fiTDN6b"
            "kkOxYDVrY0Ad8L10Hs3zH81mtnPk5uvvolIC1CXGu43obcgFxeL3khZl8IKvO61GWB6jI9b5+gLPoBc1Q="
        ),
        "SigningCertURL": "https://sns.us-west-2.amazonaws.com/SimpleNotificationService-f3ecfb7224c7233fe7bb5f59f96de52f.pem",
    }


def eventbridge_object_created(
    bucket: str,
    key: str,
    *,
    etag: str,
    size: int = 5,
    version_id: str | None = None,
    sequencer: str = "617f08299329d189",
) -> dict:
    """S3 -> EventBridge -> SQS: the rule's SQS target receives the event itself.

    Source: "EventBridge event message structure", "Object created",
    https://docs.aws.amazon.com/AmazonS3/latest/userguide/ev-events.html
    """
    obj = {"key": key, "size": size, "etag": etag, "sequencer": sequencer}
    if version_id is not None:
        obj["version-id"] = version_id
    return {
        "version": "0",
        "id": "17793124-05d4-b198-2fde-7ededc63b103",
        "detail-type": "Object Created",
        "source": "aws.s3",
        "account": "111122223333",
        "time": "2021-11-12T00:00:00Z",
        "region": "ca-central-1",
        "resources": [f"arn:aws:s3:::{bucket}"],
        "detail": {
            "version": "0",
            "bucket": {"name": bucket},
            "object": obj,
            "request-id": "N4N7GDK58NMKJ12R",
            "requester": "123456789012",
            "source-ip-address": "1.2.3.4",
            "reason": "PutObject",
        },
    }


def minio_webhook(
    bucket: str,
    key: str,
    *,
    etag: str,
    size: int = 6474,
    version_id: str = "",
    sequencer: str = "15C32494527B46C5",
) -> dict:
    """A MinIO webhook target's POST body (one record per request; the record's key URL-encoded).

    Source: MinIO documentation, "Publish Events to Webhook" / bucket notification event structure,
    https://min.io/docs/minio/linux/administration/monitoring/publish-events-to-webhook.html
    """
    return {
        "EventName": "s3:ObjectCreated:Put",
        "Key": f"{bucket}/{key}",
        "Records": [
            {
                "eventVersion": "2.0",
                "eventSource": "minio:s3",
                "awsRegion": "",
                "eventTime": "2019-09-10T17:41:54Z",
                "eventName": "s3:ObjectCreated:Put",
                "userIdentity": {"principalId": "AKIAIOSFODNN7EXAMPLE"},
                "requestParameters": {
                    "accessKey": "AKIAIOSFODNN7EXAMPLE",
                    "region": "",
                    "sourceIPAddress": "192.168.56.192",
                },
                "responseElements": {
                    "x-amz-request-id": "15C3249451E12784",
                    "x-minio-deployment-id": "751a8ba6-acb2-42f6-a297-4cdf1cf1fa4f",
                    "x-minio-origin-endpoint": "http://192.168.86.115:9000",
                },
                "s3": {
                    "s3SchemaVersion": "1.0",
                    "configurationId": "Config",
                    "bucket": {
                        "name": bucket,
                        "ownerIdentity": {"principalId": "AKIAIOSFODNN7EXAMPLE"},
                        "arn": f"arn:aws:s3:::{bucket}",
                    },
                    "object": {
                        "key": quote_plus(key),
                        "size": size,
                        "eTag": etag,
                        "contentType": "image/png",
                        "userMetadata": {"content-type": "image/png"},
                        "versionId": version_id,
                        "sequencer": sequencer,
                    },
                },
                "source": {
                    "host": "192.168.56.192",
                    "port": "",
                    "userAgent": "MinIO (linux; amd64) minio-go/v7",
                },
            }
        ],
    }


def rustfs_webhook(
    bucket: str,
    key: str,
    *,
    etag: str,
    size: int = 6474,
    version_id: str | None = None,
    sequencer: str = "1890A4C3B1E2D5F7",
) -> dict:
    """A RustFS webhook target's POST body: MinIO's envelope (`EventName`, `Key`, `Records`), the record's
    `eventSource` "rustfs:s3", its key form-encoded (space as "+", "+" as "%2B", only alphanumerics and
    `*-._` left as they are), and no `versionId` at all for an unversioned object.

    Source: RustFS's own code, rustfs/rustfs on GitHub (tag 1.0.0-rc.3): `crates/targets/src/lib.rs`
    (`TargetLog`, PascalCase envelope), `crates/notify/src/event.rs` (`Event`, `Event::new`: camelCase
    record fields, `form_urlencoded::byte_serialize` of the key, `versionId` skipped when absent).
    """
    obj: dict = {
        "key": quote_plus(key, safe="*").replace("~", "%7E"),
        "size": size,
        "eTag": etag,
        "contentType": "image/png",
        "userMetadata": {"content-type": "image/png"},
        "sequencer": sequencer,
    }
    if version_id is not None:
        obj["versionId"] = version_id
    return {
        "EventName": "s3:ObjectCreated:Put",
        "Key": f"{bucket}/{key}",
        "Records": [
            {
                "eventVersion": "2.0",
                "eventSource": "rustfs:s3",
                "awsRegion": "us-east-1",
                "eventTime": "2026-08-21T02:11:13.000Z",
                "eventName": "s3:ObjectCreated:Put",
                "userIdentity": {"principalId": "rustfsadmin"},
                "requestParameters": {"region": "us-east-1", "sourceIPAddress": "172.18.0.5"},
                "responseElements": {"x-amz-request-id": "1890A4C3B1E2D5F7"},
                "s3": {
                    "s3SchemaVersion": "1.0",
                    "configurationId": "Config",
                    "bucket": {
                        "name": bucket,
                        "ownerIdentity": {"principalId": "rustfsadmin"},
                        "arn": f"arn:aws:s3:::{bucket}",
                    },
                    "object": obj,
                },
                "source": {"host": "172.18.0.5", "port": "", "userAgent": "aws-sdk-python/1.40"},
            }
        ],
    }


def ceph_notification(
    bucket: str,
    key: str,
    *,
    etag: str,
    size: int = 1024,
    version_id: str = "",
    sequencer: str = "F7E6D75DC742D108",
) -> dict:
    """Ceph RGW bucket notification (HTTP push endpoint); keys are sent as they are, not URL-encoded.

    Source: Ceph documentation, "Bucket Notifications", "Events",
    https://docs.ceph.com/en/latest/radosgw/notifications/#events
    """
    return {
        "Records": [
            {
                "eventVersion": "2.1",
                "eventSource": "ceph:s3",
                "awsRegion": "us-east-1",
                "eventTime": "2019-11-22T13:47:35.124724Z",
                "eventName": "ObjectCreated:Put",
                "userIdentity": {"principalId": "tester"},
                "requestParameters": {"sourceIPAddress": ""},
                "responseElements": {
                    "x-amz-request-id": "503a4c37-85eb-47cd-8681-2817e80b4281.5330.903595",
                    "x-amz-id-2": "14d2-zone1-zonegroup1",
                },
                "s3": {
                    "s3SchemaVersion": "1.0",
                    "configurationId": "mynotif1",
                    "bucket": {
                        "name": bucket,
                        "ownerIdentity": {"principalId": "tester"},
                        "arn": f"arn:aws:s3:us-east-1::{bucket}",
                        "id": "503a4c37-85eb-47cd-8681-2817e80b4281.5332.38",
                    },
                    "object": {
                        "key": key,
                        "size": str(size),
                        "eTag": etag,
                        "versionId": version_id,
                        "sequencer": sequencer,
                        "metadata": [],
                        "tags": [],
                    },
                },
                "eventId": "1575221657.102001.80dad3aad8584778352c68ea8f3abc8f",
                "opaqueData": "me@example.com",
            }
        ]
    }
