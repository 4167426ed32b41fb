"""The HTTP event endpoint (`producer http`'s app on a real uvicorn server) for SNS HTTP(S) subscriptions,
MinIO webhooks and Ceph RGW HTTP push: signatures, confirmations, keys, malformed bodies, allow-lists.
Payloads are the providers' documented ones (tests/helpers/event_payloads.py); SNS is a loopback stand-in
with its own CA and signing key (tests/helpers/sns_fixture.py), trusted only by the verifier the test
builds."""

from __future__ import annotations

import json
import logging
from urllib.parse import quote

import boto3
import httpx
import pytest
from skimage import data as samples

from common.adapters.storage import boto_config
from common.state.jobs import JobStore
from producer.http_receiver import create_app, default_sns_verifier
from producer.intake import build_intake
from producer.sns import SNS_HOST, SnsRefused
from tests.helpers import event_payloads as docs
from tests.helpers.images import array_png
from tests.helpers.pipeline import put, queued_specs
from tests.helpers.servers import serve
from tests.helpers.sns_fixture import FakeSns
from tests.helpers.stack import Stack, wait_for

TOPIC = "arn:aws:sns:us-west-2:123456789012:MyTopic"
SNS_HEADERS = {"x-amz-sns-message-type": "Notification", "Content-Type": "text/plain; charset=UTF-8"}


@pytest.fixture
def fake_sns(tmp_path):
    server = FakeSns(tmp_path).start()
    yield server
    server.stop()


def post_sns(url: str, message: dict) -> httpx.Response:
    return httpx.post(
        f"{url}/s3-events",
        content=json.dumps(message),
        headers={**SNS_HEADERS, "x-amz-sns-message-type": message.get("Type", "Notification")},
    )


def test_production_verifier_trusts_sns_hosts_only(stack: Stack):
    verifier = default_sns_verifier(stack.settings.model_copy(update={"sns_topic_arns": (TOPIC,)}))
    assert verifier.host_pattern is SNS_HOST
    assert SNS_HOST.match("sns.us-west-2.amazonaws.com") and SNS_HOST.match("sns.cn-north-1.amazonaws.com.cn")
    for host in (
        "sns.us-west-2.amazonaws.com.evil.example",
        "evil.example",
        "127.0.0.1",
        "xsns.us-west-2.amazonaws.com",
    ):
        assert not SNS_HOST.match(host), host
    message = docs.sns_envelope(docs.aws_test_event("b"), topic_arn=TOPIC)
    message["SigningCertURL"] = "https://sns.us-west-2.amazonaws.com.evil.example/cert.pem"
    with pytest.raises(SnsRefused, match="not an SNS host"):
        verifier.verify(message)
    with pytest.raises(SnsRefused, match="not enabled"):
        default_sns_verifier(stack.settings).verify(message)  # no topics configured: SNS over HTTP is off


@pytest.mark.timeout(300)
def test_sns_subscription_and_signed_notifications_end_to_end(stack: Stack, fake_sns: FakeSns):
    settings = stack.settings.model_copy(update={"producer_http_token": "s3cret", "sns_topic_arns": (TOPIC,)})
    s3 = boto3.client(
        "s3", region_name=settings.aws_region, endpoint_url=settings.s3_endpoint_url, config=boto_config()
    )
    s3.put_bucket_notification_configuration(Bucket=settings.input_bucket, NotificationConfiguration={})
    stack.start_worker("general-light", extra_env={"BIREFNET_TEST_OPERATING_RESOLUTION": "128x128"})
    keys = ["sns-http/c++ notes 1.png", "sns-http/ünï 100%.png"]
    etags = [
        s3.put_object(Bucket=settings.input_bucket, Key=k, Body=array_png(samples.astronaut()[:64, :48]))[
            "ETag"
        ].strip('"')
        for k in keys
    ]

    def notification(n: int) -> dict:
        return docs.sns_envelope(
            docs.aws_notification(docs.aws_record(settings.input_bucket, keys[n], etag=etags[n])),
            topic_arn=TOPIC,
        )

    token = (
        "2336412f37fb687f5d51e6e241d09c805a5a57b30d712f794cc5f6a988666d92768dd60a747ba6f3beb71854e285d6ad"
        "02428b09ceece29417f1f02d609c582afbacc99c583a916b9981dd2728f4ae6fdb82efd087cc3b7849e05798d2d2785c"
        "03b0879594eeac82c01f235d0e717736"
    )
    confirm_url = f"{fake_sns.base}/?Action=ConfirmSubscription&TopicArn={quote(TOPIC)}&Token={token}"
    with serve(create_app(settings, sns=fake_sns.verifier((TOPIC,)))) as url:
        confirmed = post_sns(
            url, fake_sns.sign(docs.sns_subscription_confirmation(TOPIC, confirm_url, token), "1")
        )
        assert confirmed.status_code == 200 and confirmed.json() == {"confirmed": TOPIC}, confirmed.text
        assert fake_sns.confirmed == [
            {"Action": ["ConfirmSubscription"], "TopicArn": [TOPIC], "Token": [token]}
        ]
        # A confirmation whose SubscribeURL is not SNS is refused, and nothing is fetched.
        elsewhere = docs.sns_subscription_confirmation(
            TOPIC, "https://example.com/?Action=ConfirmSubscription", token
        )
        assert post_sns(url, fake_sns.sign(elsewhere)).status_code == 403
        assert len(fake_sns.confirmed) == 1

        v2 = post_sns(url, fake_sns.sign(notification(0), "2"))
        v1 = post_sns(url, fake_sns.sign(notification(1), "1"))
        assert v2.status_code == 200 and v1.status_code == 200, (v2.text, v1.text)
        request_ids = v2.json()["request_ids"] + v1.json()["request_ids"]
        assert len(set(request_ids)) == 2

        forged = fake_sns.sign(notification(0))
        forged["Message"] = forged["Message"].replace(etags[0], "0" * 32)
        assert forged["Message"] != notification(0)["Message"]
        unsigned = {k: v for k, v in notification(0).items() if k not in ("Signature", "SignatureVersion")}
        foreign_cert = {**fake_sns.sign(notification(0)), "SigningCertURL": "https://example.com/cert.pem"}
        other_topic = fake_sns.sign(
            {**notification(0), "TopicArn": "arn:aws:sns:us-west-2:999999999999:Evil"}
        )
        for name, message in (
            ("forged", forged),
            ("unsigned", unsigned),
            ("foreign cert", foreign_cert),
            ("other topic", other_topic),
        ):
            refused = post_sns(url, message)
            assert refused.status_code == 403, (name, refused.text)
        # Without the SNS header, a body is an ordinary notification and needs the bearer token.
        assert httpx.post(f"{url}/s3-events", content=json.dumps(notification(0))).status_code == 401

    store = JobStore.from_url(settings.redis_url)
    wait_for(
        lambda: all(store.status(r) == "COMPLETED" for r in request_ids), 240, "both SNS jobs to complete"
    )
    for rid, key in zip(request_ids, keys, strict=True):
        record = store.get(rid)
        assert record.ok, record.error
        assert record.spec.image_url == f"s3://{settings.input_bucket}/{key}"
        assert (record.result["image"]["width"], record.result["image"]["height"]) == (48, 64)
    assert fake_sns.cert_fetches == 1, "the signing certificate is fetched once and kept"


def test_minio_and_ceph_bodies_keys_bad_records_and_allow_list(stack: Stack, caplog):
    settings = stack.settings.model_copy(update={"input_prefixes": {stack.settings.input_bucket: ["in/"]}})
    bucket = settings.input_bucket
    ceph_key, minio_key = "in/c++ notes 1.png", "in/ünï%2F + 猫.png"
    ceph_etag, minio_etag = put(stack, ceph_key), put(stack, minio_key)
    caplog.set_level(logging.INFO, logger="producer")
    with serve(create_app(settings, build_intake(settings))) as url:
        ceph = httpx.post(f"{url}/s3-events", json=docs.ceph_notification(bucket, ceph_key, etag=ceph_etag))
        minio = httpx.post(f"{url}/s3-events", json=docs.minio_webhook(bucket, minio_key, etag=minio_etag))
        assert ceph.status_code == 200 and minio.status_code == 200, (ceph.text, minio.text)
        assert len(ceph.json()["request_ids"]) == 1 and len(minio.json()["request_ids"]) == 1

        good = docs.minio_webhook(bucket, minio_key, etag=minio_etag)["Records"][0]
        partial = httpx.post(f"{url}/s3-events", json={"Records": [None, good, {"eventName": 5}]})
        assert partial.status_code == 200 and partial.json()["request_ids"] == minio.json()["request_ids"]
        assert [r["record"] for r in partial.json()["rejected"]] == [0, 2]
        for body in (
            {"Records": [None]},
            {"Records": [{"eventName": "ObjectCreated:Put", "s3": []}]},
            {"Records": None},
            [],
            "null",
            {"EventName": "s3:ObjectCreated:Put", "Key": "b/k"},
        ):
            bad = httpx.post(
                f"{url}/s3-events", content=json.dumps(body) if not isinstance(body, str) else body
            )
            assert bad.status_code == 400 and bad.json()["detail"], (body, bad.text)

        outside = httpx.post(f"{url}/s3-events", json=docs.minio_webhook(bucket, "elsewhere/a.png", etag="e"))
        foreign = httpx.post(
            f"{url}/s3-events", json=docs.minio_webhook("someone-else", "in/a.png", etag="e")
        )
        output = httpx.post(
            f"{url}/s3-events", json=docs.minio_webhook(settings.output_bucket, "results/x.png", etag="e")
        )
        assert [r.json()["request_ids"] for r in (outside, foreign, output)] == [[], [], []]
    specs = {s["image_url"] for s in queued_specs(stack, "birefnet.general-light")}
    assert specs == {f"s3://{bucket}/{ceph_key}", f"s3://{bucket}/{minio_key}"}, "keys arrive intact"
    text = caplog.text
    assert "outside bucket" in text and "input prefixes ['in/']" in text
    assert "bucket 'someone-else' is not an input bucket" in text
    assert f"it is in the output bucket '{settings.output_bucket}'" in text


def test_stale_and_overwritten_events_are_superseded_once(stack: Stack):
    """Unversioned key: an event older (by sequencer) than one already handled, or naming an ETag the key
    no longer has, ends as one 'superseded' job (no job that could run); redelivery finds that job."""
    settings, bucket = stack.settings, stack.settings.input_bucket
    key, other = "stale/c++ shot.png", "stale/overwritten.png"
    etag_a = put(stack, key, body=b"first upload")
    etag_b = put(stack, key, body=b"second upload")
    etag_c = put(stack, other, body=b"third upload")
    put(stack, other, body=b"fourth upload")

    def body(k: str, etag: str, sequencer: str) -> dict:
        return docs.aws_notification(docs.aws_record(bucket, k, etag=etag, sequencer=sequencer))

    with serve(create_app(settings)) as url:
        newer = httpx.post(f"{url}/s3-events", json=body(key, etag_b, "0060D9D2B9F3A1C4E0")).json()[
            "request_ids"
        ]
        stale = httpx.post(f"{url}/s3-events", json=body(key, etag_a, "0060D9D2B9F3A1C4D0")).json()[
            "request_ids"
        ]
        again = httpx.post(f"{url}/s3-events", json=body(key, etag_a, "0060D9D2B9F3A1C4D0")).json()[
            "request_ids"
        ]
        gone = httpx.post(f"{url}/s3-events", json=body(other, etag_c, "0061")).json()["request_ids"]
    assert len(newer) == len(stale) == len(gone) == 1 and stale == again and stale != newer
    (queued,) = queued_specs(stack, "birefnet.general-light")
    assert queued["request_id"] == newer[0] and queued["input_etag"] == etag_b, "only the current upload runs"
    store = JobStore.from_url(settings.redis_url)
    for rid, why in ((stale[0], "is stale"), (gone[0], "replaced by a newer upload")):
        record = store.get(rid)
        assert record.status == "COMPLETED" and record.error_type == "file_download_error"
        assert "superseded by a newer upload" in record.error and why in record.error, record.error
        s3 = boto3.client(
            "s3", region_name=settings.aws_region, endpoint_url=settings.s3_endpoint_url, config=boto_config()
        )
        document = json.loads(
            s3.get_object(Bucket=settings.output_bucket, Key=record.spec.output_prefix + "result.json")[
                "Body"
            ].read()
        )
        assert "superseded" in document["detail"][0]["msg"]
