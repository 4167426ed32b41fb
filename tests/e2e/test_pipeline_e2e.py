"""End to end, with real parts: upload -> S3 event in SQS -> producer -> Redis -> worker process -> S3 ->
webhook."""

from __future__ import annotations

import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image
from skimage import data as samples

from common.settings import Settings
from devstack.receiver import WebhookReceiver
from tests.helpers.images import array_png
from tests.helpers.pipeline import queue_is_empty, s3_client
from tests.helpers.stack import Stack, wait_for


def start_pipeline(stack: Stack) -> None:
    stack.start(["-m", "producer", "sqs"], "producer")
    stack.start(["-m", "deliverer", "--concurrency", "2"], "webhooks")
    stack.start_worker("general-light")


def expected_mask(settings: Settings, image: Image.Image) -> np.ndarray:
    """The model's mask for this input, computed here with the same variant and weights as the worker."""
    from bench.reference_paths import mask_to_image
    from worker.engine import Predictor

    predictor = Predictor(settings.variants.get("general-light"), settings)
    predictor.load()
    (mask,) = predictor.predict_masks([image], (1024, 1024))
    return np.asarray(mask_to_image(mask))


@pytest.mark.timeout(300)
def test_upload_comes_back_cut_out_with_webhook(stack: Stack, webhook_receiver: WebhookReceiver):
    settings = stack.settings
    start_pipeline(stack)
    s3 = s3_client(settings)
    photo = samples.astronaut()  # 512x512 RGB
    s3.put_object(
        Bucket=settings.input_bucket,
        Key="photos/astronaut one.png",
        Body=array_png(photo),
        ContentType="image/png",
        Metadata={"output_mask": "true", "webhook_url": webhook_receiver.url, "output_format": "png"},
    )

    (delivery,) = webhook_receiver.wait(1, timeout=180)
    body = delivery.json()
    assert body["status"] == "OK", body
    assert body["error"] is None
    assert body["request_id"] and body["gateway_request_id"] == body["request_id"]
    image_file, mask_file = body["payload"]["image"], body["payload"]["mask_image"]
    assert (image_file["width"], image_file["height"]) == (512, 512)
    assert image_file["content_type"] == "image/png" and mask_file["content_type"] == "image/png"

    cutout_bytes = httpx.get(image_file["url"]).content  # the presigned URL works as given
    assert len(cutout_bytes) == image_file["file_size"]
    cutout = Image.open(io.BytesIO(cutout_bytes))
    assert cutout.mode == "RGBA" and cutout.size == (512, 512)
    alpha = np.asarray(cutout)[..., 3]
    assert alpha.min() < alpha.max(), "alpha channel carries the mask"

    mask = Image.open(io.BytesIO(httpx.get(mask_file["url"]).content))
    assert mask.mode == "L" and mask.size == (512, 512)
    want = expected_mask(settings, Image.fromarray(photo))
    got = np.asarray(mask)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    assert np.array_equal(alpha, got) or np.abs(alpha.astype(int) - got.astype(int)).max() <= 1

    # The result document in the output bucket is fal's output schema, the same as the webhook payload.
    listing = s3.list_objects_v2(Bucket=settings.output_bucket, Prefix=settings.output_prefix)["Contents"]
    keys = sorted(obj["Key"] for obj in listing)
    assert all(k.startswith(f"{settings.output_prefix}uploads/photos/astronaut one.png/") for k in keys), keys
    assert {k.rsplit("/", 1)[1] for k in keys} == {"cutout.png", "mask.png", "result.json"}
    result_key = next(k for k in keys if k.endswith("result.json"))
    document = json.loads(s3.get_object(Bucket=settings.output_bucket, Key=result_key)["Body"].read())
    assert document["image"]["file_size"] == image_file["file_size"]
    assert set(document) >= {"image", "mask_image"}


@pytest.mark.timeout(300)
def test_bad_image_gets_error_and_next_image_still_works(stack: Stack, webhook_receiver: WebhookReceiver):
    settings = stack.settings
    start_pipeline(stack)
    s3 = s3_client(settings)
    hook = {"webhook_url": webhook_receiver.url}
    s3.put_object(
        Bucket=settings.input_bucket, Key="bad/not-an-image.jpg", Body=b"<html>nope</html>", Metadata=hook
    )
    (delivery,) = webhook_receiver.wait(1, timeout=180)
    body = delivery.json()
    assert body["status"] == "ERROR"
    assert body["error"] == "Invalid status code: 422"
    (detail,) = body["payload"]["detail"]
    assert detail["type"] == "image_load_error" and detail["loc"] == ["body", "image_url"]
    assert "image" in detail["msg"].lower()

    s3.put_object(
        Bucket=settings.input_bucket, Key="good/chelsea.png", Body=array_png(samples.chelsea()), Metadata=hook
    )
    deliveries = webhook_receiver.wait(2, timeout=180)
    good = deliveries[1].json()
    assert good["status"] == "OK", good
    assert (good["payload"]["image"]["width"], good["payload"]["image"]["height"]) == (451, 300)

    # The bad upload's error document sits where its result would have been.
    listing = s3.list_objects_v2(
        Bucket=settings.output_bucket, Prefix=f"{settings.output_prefix}uploads/bad/"
    )
    (error_doc,) = [o["Key"] for o in listing["Contents"] if o["Key"].endswith("result.json")]
    document = json.loads(s3.get_object(Bucket=settings.output_bucket, Key=error_doc)["Body"].read())
    assert document["detail"][0]["type"] == "image_load_error"


@pytest.mark.timeout(300)
def test_invalid_metadata_is_an_error_result_not_a_crash(stack: Stack, webhook_receiver: WebhookReceiver):
    settings = stack.settings
    start_pipeline(stack)
    s3 = s3_client(settings)
    s3.put_object(
        Bucket=settings.input_bucket,
        Key="x/astronaut.png",
        Body=array_png(samples.astronaut()),
        Metadata={"webhook_url": webhook_receiver.url, "model": "Fancy"},
    )
    (delivery,) = webhook_receiver.wait(1, timeout=120)
    body = delivery.json()
    assert body["status"] == "ERROR"
    (detail,) = body["payload"]["detail"]
    assert detail["loc"] == ["body", "model"] and "Fancy" not in detail["type"]
    assert "model" in detail["msg"]
    # The producer is still alive and consuming.
    assert stack.processes[0].poll() is None
    wait_for(lambda: queue_is_empty(settings), 30, "the SQS message to be deleted")
