"""One-shot setup of the compose stack's S3 store (RustFS): the input and output buckets, and the input
bucket's s3:ObjectCreated:* notifications to the producer's webhook target. Idempotent; run by the
`s3-init` service with the app image (boto3), configured by environment variables only."""

from __future__ import annotations

import os
import sys
import time

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError


def client():
    return boto3.client(
        "s3",
        endpoint_url=os.environ["S3_ENDPOINT_URL"],
        region_name=os.environ.get("AWS_REGION", "us-east-1"),
        aws_access_key_id=os.environ["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=os.environ["AWS_SECRET_ACCESS_KEY"],
        config=Config(
            retries={"max_attempts": 2}, connect_timeout=3, read_timeout=10, s3={"addressing_style": "path"}
        ),
    )


def wait_for_store(s3, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            s3.list_buckets()
            return
        except (BotoCoreError, ClientError) as exc:
            if time.monotonic() > deadline:
                raise SystemExit(f"S3 store at {os.environ['S3_ENDPOINT_URL']} not answering: {exc}") from exc
            time.sleep(2)


def ensure_bucket(s3, name: str) -> None:
    try:
        s3.head_bucket(Bucket=name)
        print(f"bucket {name}: exists")
    except ClientError:
        s3.create_bucket(Bucket=name)
        print(f"bucket {name}: created")


def main() -> int:
    s3 = client()
    wait_for_store(s3, float(os.environ.get("S3_WAIT_SECONDS", "120")))
    input_bucket, output_bucket = os.environ["INPUT_BUCKET"], os.environ["OUTPUT_BUCKET"]
    for bucket in (input_bucket, output_bucket):
        ensure_bucket(s3, bucket)
    arn = os.environ["S3_EVENTS_ARN"]
    s3.put_bucket_notification_configuration(
        Bucket=input_bucket,
        NotificationConfiguration={
            "QueueConfigurations": [
                {"Id": "birefnet-producer", "QueueArn": arn, "Events": ["s3:ObjectCreated:*"]}
            ]
        },
    )
    current = s3.get_bucket_notification_configuration(Bucket=input_bucket).get("QueueConfigurations", [])
    if not any(c.get("QueueArn") == arn for c in current):
        print(f"the store did not keep the notification to {arn}: {current}", file=sys.stderr)
        return 1
    print(f"bucket {input_bucket}: s3:ObjectCreated:* -> {arn}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
