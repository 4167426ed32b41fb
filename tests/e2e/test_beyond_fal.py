"""Beyond fal, through real processes: background colour/image, crop to subject, JPEG/AVIF, mask reuse
(compose route), the content cache (API and bucket uploads), and their fal-style 422s.

Real parts: redis-server, moto (S3+SQS), two `python -m worker` processes (general-light; general-heavy with
AVIF switched off by the testing-only BIREFNET_TEST_UNSUPPORTED_OUTPUT_FORMATS), `python -m producer sqs`, the
gateway on uvicorn over HTTPS, an image server on 127.0.0.1, and the official Python fal-client. Workers run
the nano model with recipe weights at 256x256 (logged), so jobs take a fraction of a second. "The network ran"
is read from the worker's Prometheus counter birefnet_masks_total{source="network"}.
"""

from __future__ import annotations

import io
import json
import re
import ssl
from pathlib import Path

import boto3
import httpx
import numpy as np
import pytest
from PIL import Image, ImageOps

from common.adapters.storage import boto_config
from common.domain.auth import hash_secret
from devstack.services import free_port, provision_aws
from tests.helpers.fal_client import run_client
from tests.helpers.gateway import ALICE, BOB, GatewayStack, start_gateway_stack
from tests.helpers.images import data_uri, png_bytes
from tests.helpers.servers import FileServer
from tests.helpers.stack import wait_for

V2 = "/queue/fal-ai/birefnet/v2"
REQ = "/queue/fal-ai/birefnet/requests"
RUN_REQ = "/run/fal-ai/birefnet/requests"
CAROL = "carol:carol-secret"  # carol and dave share the content cache; alice and bob keep their own
DAVE = "dave:dave-secret"
MAX_INPUT = 200_000
HEAVY = {"model": "General Use (Heavy)"}  # served by the worker without AVIF
PRODUCTS = {"products/": {"background_color": "#ffffff", "output_format": "jpeg", "crop_to_subject": True}}


def keys_setting() -> str:
    entries = [("alice", "key"), ("bob", "key"), ("carol", "shared"), ("dave", "shared")]
    return json.dumps(
        [
            {"id": name, "hash": hash_secret(f"{name}-secret", "sha256"), "mask_cache": scope}
            for name, scope in entries
        ]
    )


@pytest.fixture(scope="module")
def metrics_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def gs(redis_server, moto_endpoint, tmp_path_factory, metrics_port) -> GatewayStack:
    stack = start_gateway_stack(
        redis_server.port,
        moto_endpoint,
        tmp_path_factory.mktemp("beyond"),
        tls=True,
        workers=(),
        webhooks=False,
        extra={
            "BIREFNET_GATEWAY_API_KEYS": keys_setting(),
            "BIREFNET_MAX_INPUT_BYTES": str(MAX_INPUT),
            "BIREFNET_MASK_CACHE_SECONDS": "3600",
            "BIREFNET_MASK_CACHE_UPLOADS_SCOPE": "shared",
            "BIREFNET_PREFIX_DEFAULTS": json.dumps(PRODUCTS),
        },
    )
    try:
        # Both load at once (a worker's start dominates this module's time).
        heavy = stack.stack.start_worker(
            "general-heavy",
            name="worker-heavy",
            wait=False,
            extra_env={"BIREFNET_TEST_UNSUPPORTED_OUTPUT_FORMATS": "avif"},
        )
        stack.stack.start_worker(
            "general-light", extra_env={"BIREFNET_WORKER_METRICS_PORT": str(metrics_port)}
        )
        ready = Path(stack.stack.env["BIREFNET_TEST_LOG_DIR"]) / "worker-heavy.ready"
        wait_for(lambda: ready.exists() or heavy.poll() is not None, 120, "the general-heavy worker")
        assert heavy.poll() is None, stack.stack.tail("worker-heavy")
        # start_gateway_stack made the event queue; name it for the producer (create_queue is idempotent).
        events = provision_aws(
            stack.settings, queue_name=f"events-{stack.settings.input_bucket.removeprefix('in-')}"
        )
        stack.stack.start(["-m", "producer", "sqs"], "producer", {"BIREFNET_SQS_QUEUE_URL": events.queue_url})
    except BaseException:
        stack.close()
        raise
    yield stack
    stack.close()


@pytest.fixture(scope="module")
def files() -> FileServer:
    backdrop = Image.linear_gradient("L").resize((120, 40)).convert("RGB")
    buffer = io.BytesIO()
    backdrop.save(buffer, format="PNG")
    server = FileServer(
        {
            "/backdrop.png": (buffer.getvalue(), "image/png"),
            "/page.html": (b"<html>no image</html>", "text/html"),
            "/huge.png": (b"\x89PNG" + bytes(MAX_INPUT + 10), "image/png"),
        }
    )
    yield server
    server.stop()


def client(gs: GatewayStack, credential: str) -> httpx.Client:
    return httpx.Client(
        base_url=gs.url,
        headers={"Authorization": f"Key {credential}"},
        timeout=60,
        verify=ssl.create_default_context(cafile=str(gs.gateway.tls.ca)),
    )


def photo(seed: int) -> str:
    """A distinct small image per test, so tests sharing a key's cache scope do not meet in it."""
    return data_uri(png_bytes((96, 64), color=(seed * 7 % 256, 30, 90)))


def submit(gs: GatewayStack, credential: str, body: dict, path: str = V2) -> str:
    with client(gs, credential) as c:
        response = c.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()["request_id"]


def outcome(gs: GatewayStack, credential: str, request_id: str) -> tuple[dict, httpx.Response]:
    status = gs.wait_status(request_id, "COMPLETED", credential, timeout=120)
    with client(gs, credential) as c:
        return status, c.get(f"{REQ}/{request_id}")


def output(gs: GatewayStack, credential: str, body: dict, path: str = V2) -> dict:
    rid = submit(gs, credential, body, path)
    _, result = outcome(gs, credential, rid)
    assert result.status_code == 200, result.text
    return {"id": rid, **result.json()}


def fetch(item: dict) -> Image.Image:
    data = httpx.get(item["url"]).content
    assert len(data) == item["file_size"]
    image = Image.open(io.BytesIO(data))
    image.load()
    assert image.size == (item["width"], item["height"]), "width/height describe the file"
    return image


def logs(gs: GatewayStack, credential: str, request_id: str) -> list[str]:
    with client(gs, credential) as c:
        return [e["message"] for e in c.get(f"{REQ}/{request_id}/status", params={"logs": 1}).json()["logs"]]


def masks_total(port: int, source: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    pattern = (
        rf'^birefnet_masks_total\{{(?=[^}}]*variant="general-light")'
        rf'(?=[^}}]*source="{source}")[^}}]*\}} (\S+)$'
    )
    match = re.search(pattern, text, re.M)
    return float(match.group(1)) if match else 0.0


def rejection(gs: GatewayStack, credential: str, body: dict, path: str = V2) -> dict:
    """The single 422 detail item of a request the model rejects."""
    rid = submit(gs, credential, body, path)
    status, result = outcome(gs, credential, rid)
    assert result.status_code == 422, result.text
    assert status["error"] == "Invalid status code: 422"
    (item,) = result.json()["detail"]
    assert status["error_type"] == item["type"]
    return item


# --- validation -------------------------------------------------------------------------------------
def test_every_extension_field_is_validated_with_fal_style_422s(gs):
    image = photo(1)
    cases = [
        ({"background_color": "red"}, "background_color", "color_format"),
        ({"background_color": "#fff"}, "background_color", "color_format"),
        ({"background_color": "#12345g"}, "background_color", "color_format"),
        ({"background_color": "#1122334455"}, "background_color", "color_format"),
        ({"background_color": 255}, "background_color", "string_type"),
        ({"background_image_url": "ftp://x.example/b.png"}, "background_image_url", "url_scheme"),
        (
            {"background_image_url": "https://x.example/b.png", "background_fit": "tile"},
            "background_fit",
            "enum",
        ),
        ({"crop_to_subject": True, "crop_margin": "ten"}, "crop_margin", "value_error"),
        ({"crop_to_subject": True, "crop_margin": "500%"}, "crop_margin", "value_error"),
        ({"crop_to_subject": True, "crop_margin": -3}, "crop_margin", "value_error"),
        ({"crop_to_subject": True, "crop_aspect_ratio": "16:0"}, "crop_aspect_ratio", "value_error"),
        ({"crop_to_subject": True, "crop_aspect_ratio": "wide"}, "crop_aspect_ratio", "value_error"),
        ({"crop_to_subject": True, "crop_threshold": 0}, "crop_threshold", "greater_than"),
        ({"output_format": "jpeg"}, "output_format", "value_error"),
        ({"output_format": "jpeg", "background_color": "#ffffff80"}, "output_format", "value_error"),
        (
            {
                "output_format": "jpeg",
                "background_image_url": "https://x.example/b.png",
                "background_fit": "contain",
            },
            "output_format",
            "value_error",
        ),
        ({"output_format": "bmp"}, "output_format", "enum"),
        ({"mask_only": True, "background_color": "#ffffff"}, "mask_only", "value_error"),
    ]
    ids = [(submit(gs, ALICE, {"image_url": image, **body}), field, kind) for body, field, kind in cases]
    for rid, field, kind in ids:
        status, result = outcome(gs, ALICE, rid)
        assert result.status_code == 422, (field, result.text)
        (item,) = result.json()["detail"]
        assert (item["loc"], item["type"]) == (["body", field], kind), item
        assert item["msg"] and status["error"] == "Invalid status code: 422"
    assert "jpeg" in rejection(gs, ALICE, {"image_url": image, "output_format": "jpeg"})["msg"]
    # Sync run answers the 422 itself.
    with client(gs, ALICE) as c:
        run = c.post("/run/fal-ai/birefnet", json={"image_url": image, "background_color": "blue"})
    assert run.status_code == 422 and run.json()["detail"][0]["loc"] == ["body", "background_color"]


# --- background ---------------------------------------------------------------------------------------
def test_background_colour_composites_the_refined_cut_out(gs):
    image = photo(2)
    plain = output(gs, ALICE, {"image_url": image})
    cutout = fetch(plain["image"])
    assert cutout.mode == "RGBA" and 0 < np.asarray(cutout)[..., 3].min() < 255, (
        "a soft mask: compositing shows"
    )

    green = output(gs, ALICE, {"image_url": image, "background_color": "#00FF00"})
    composed = fetch(green["image"])
    assert composed.mode == "RGB" and green["image"]["content_type"] == "image/png", "opaque colour: no alpha"
    want = Image.alpha_composite(Image.new("RGBA", cutout.size, (0, 255, 0, 255)), cutout).convert("RGB")
    assert np.array_equal(np.asarray(composed), np.asarray(want))

    half = fetch(output(gs, ALICE, {"image_url": image, "background_color": "#00ff0080"})["image"])
    assert half.mode == "RGBA", "a colour with alpha keeps an alpha channel"
    want = Image.alpha_composite(Image.new("RGBA", cutout.size, (0, 255, 0, 128)), cutout)
    assert np.abs(np.asarray(half, dtype=int) - np.asarray(want, dtype=int)).max() <= 1

    jpeg = output(
        gs,
        ALICE,
        {"image_url": image, "background_color": "#00ff00", "output_format": "jpeg", "output_mask": True},
    )
    assert jpeg["image"]["content_type"] == "image/jpeg" and jpeg["image"]["file_name"].endswith(".jpg")
    decoded = fetch(jpeg["image"])
    assert decoded.format == "JPEG" and decoded.mode == "RGB"
    assert np.abs(np.asarray(decoded, dtype=int) - np.asarray(composed, dtype=int)).mean() < 4
    assert jpeg["mask_image"]["content_type"] == "image/png", "masks stay lossless"


def test_background_image_fits_and_its_failures(gs, files):
    image = photo(3)
    cutout = fetch(output(gs, ALICE, {"image_url": image})["image"])
    backdrop = Image.open(io.BytesIO(httpx.get(files.url("/backdrop.png")).content)).convert("RGB")
    for fit, fitted in (
        ("cover", ImageOps.fit(backdrop, cutout.size, Image.Resampling.LANCZOS)),
        ("stretch", backdrop.resize(cutout.size, Image.Resampling.LANCZOS)),
    ):
        got = fetch(
            output(
                gs,
                ALICE,
                {
                    "image_url": image,
                    "background_image_url": files.url("/backdrop.png"),
                    "background_fit": fit,
                },
            )["image"]
        )
        assert got.mode == "RGB", fit
        want = Image.alpha_composite(fitted.convert("RGBA"), cutout).convert("RGB")
        assert np.array_equal(np.asarray(got), np.asarray(want)), fit
    contained = fetch(
        output(
            gs,
            ALICE,
            {
                "image_url": image,
                "background_image_url": files.url("/backdrop.png"),
                "background_fit": "contain",
            },
        )["image"]
    )
    assert contained.mode == "RGBA", "contain without a colour leaves transparent bands"
    alpha = np.asarray(contained)[..., 3]  # 120x40 fits 96x64 as a 96x32 band across the middle
    assert alpha[32, :].min() == 255 and alpha[0, :].max() < 255, (
        "backdrop in the band, only the cut-out above"
    )

    closed = f"http://127.0.0.1:{free_port()}/nothing.png"
    failures = {
        files.url("/missing.png"): "file_download_error",
        closed: "file_download_error",
        files.url("/huge.png"): "image_too_large",
        files.url("/page.html"): "image_load_error",
        data_uri(b"<html>", "text/html"): "image_load_error",
    }
    ids = {
        submit(gs, ALICE, {"image_url": image, "background_image_url": url}): kind
        for url, kind in failures.items()
    }
    for rid, kind in ids.items():
        status, result = outcome(gs, ALICE, rid)
        assert result.status_code == 422, result.text
        (item,) = result.json()["detail"]
        assert (item["loc"], item["type"]) == (["body", "background_image_url"], kind), item
        assert item["msg"].startswith("background_image_url: ")
    # The SSRF guard refuses cloud metadata addresses at submit, as it does for image_url.
    item = rejection(
        gs, ALICE, {"image_url": image, "background_image_url": "http://169.254.169.254/latest/x.png"}
    )
    assert item["loc"] == ["body", "background_image_url"] and item["type"] == "file_download_error"
    # Another key's private bucket is as off limits for a background as for an input.
    item = rejection(
        gs, BOB, {"image_url": image, "background_image_url": f"s3://{gs.settings.input_bucket}/a.png"}
    )
    assert item["loc"] == ["body", "background_image_url"] and "may not read" in item["msg"]


# --- crop ---------------------------------------------------------------------------------------------
def expected_box(mask: np.ndarray, margin_percent: float, ratio: float) -> tuple[int, int]:
    """Output size of crop_to_subject at threshold 0.5 (8-bit level >= 128), written out independently."""
    ys, xs = np.nonzero(mask >= 128)
    width, height = xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()
    width += 2 * round(width * margin_percent / 100)
    height += 2 * round(height * margin_percent / 100)
    if width / height < ratio:
        width = round(height * ratio)
    else:
        height = round(width / ratio)
    return int(width), int(height)


def test_crop_to_subject_and_crop_on_an_empty_mask(gs):
    image = photo(4)
    plain = output(gs, ALICE, {"image_url": image, "output_mask": True})
    mask = np.asarray(fetch(plain["mask_image"]))
    cropped = output(
        gs,
        ALICE,
        {
            "image_url": image,
            "crop_to_subject": True,
            "crop_margin": "10%",
            "crop_aspect_ratio": "1:1",
            "output_mask": True,
            "output_format": "webp",
        },
    )
    size = expected_box(mask, 10, 1.0)
    assert (cropped["image"]["width"], cropped["image"]["height"]) == size
    assert (cropped["mask_image"]["width"], cropped["mask_image"]["height"]) == size
    assert fetch(cropped["image"]).size == size and cropped["image"]["content_type"] == "image/webp"
    pixels = output(gs, ALICE, {"image_url": image, "crop_to_subject": True, "crop_margin": 7})
    ys, xs = np.nonzero(mask >= 128)
    assert (pixels["image"]["width"], pixels["image"]["height"]) == (
        xs.max() + 1 - xs.min() + 14,
        ys.max() + 1 - ys.min() + 14,
    )

    # No pixel reaches the threshold: a clear 422, not an empty or uncropped image.
    assert mask.max() < 255, "recipe weights give soft masks; the threshold below must exceed the mask"
    item = rejection(
        gs,
        ALICE,
        {"image_url": image, "crop_to_subject": True, "crop_threshold": (int(mask.max()) + 1) / 255},
    )
    assert (item["loc"], item["type"]) == (["body", "crop_to_subject"], "subject_not_found")
    assert "no subject" in item["msg"]


# --- AVIF ---------------------------------------------------------------------------------------------
def test_avif_with_alpha_and_a_clear_422_where_unsupported(gs):
    image = photo(5)
    avif = output(gs, ALICE, {"image_url": image, "output_format": "avif", "output_mask": True})
    assert avif["image"]["content_type"] == "image/avif" and avif["image"]["file_name"].endswith(".avif")
    decoded = fetch(avif["image"])
    assert decoded.format == "AVIF" and decoded.mode == "RGBA", "AVIF keeps the alpha channel"
    assert avif["mask_image"]["content_type"] == "image/png"

    item = rejection(gs, ALICE, {"image_url": image, "output_format": "avif", **HEAVY})
    assert (item["loc"], item["type"]) == (["body", "output_format"], "unsupported_output_format")
    assert "avif" in item["msg"] and "png, webp or gif" in item["msg"]


# --- mask reuse: compose and the content cache --------------------------------------------------------
OPTIONS = {
    "background_color": "#203040",
    "crop_to_subject": True,
    "crop_margin": "5%",
    "crop_aspect_ratio": "4:3",
    "output_mask": True,
}


@pytest.mark.timeout(300)
def test_compose_reuses_the_mask_with_the_pixels_of_a_fresh_run(gs, metrics_port):
    image = photo(6)
    network0 = masks_total(metrics_port, "network")
    compose0, cache0 = masks_total(metrics_port, "compose"), masks_total(metrics_port, "cache")
    source = output(gs, ALICE, {"image_url": image})
    assert masks_total(metrics_port, "network") == network0 + 1

    with client(gs, ALICE) as c:
        answer = c.post(f"{REQ}/{source['id']}/compose", json=OPTIONS)
    assert answer.status_code == 200, answer.text
    submitted = answer.json()
    assert submitted["status"] == "IN_QUEUE" and submitted["request_id"] != source["id"]
    assert submitted["status_url"].endswith(f"/requests/{submitted['request_id']}/status")
    status, result = outcome(gs, ALICE, submitted["request_id"])
    assert result.status_code == 200, result.text
    composed = result.json()
    assert masks_total(metrics_port, "network") == network0 + 1, "compose did not run the network"
    assert masks_total(metrics_port, "compose") == compose0 + 1
    assert any("the network did not run" in m for m in logs(gs, ALICE, submitted["request_id"]))

    fresh = output(gs, BOB, {"image_url": image, **OPTIONS})  # bob's own cache scope: a fresh network run
    assert masks_total(metrics_port, "network") == network0 + 2
    for name in ("image", "mask_image"):
        assert np.array_equal(np.asarray(fetch(composed[name])), np.asarray(fetch(fresh[name]))), name
    assert fetch(composed["image"]).mode == "RGB"

    # alice asking again with the image itself: the content cache, same pixels, no network run.
    again = output(gs, ALICE, {"image_url": image, **OPTIONS})
    assert masks_total(metrics_port, "network") == network0 + 2
    assert masks_total(metrics_port, "cache") == cache0 + 1
    assert np.array_equal(np.asarray(fetch(again["image"])), np.asarray(fetch(fresh["image"])))
    assert any("content cache" in m for m in logs(gs, ALICE, again["id"]))

    # Sync compose, chained on the compose request, with new options.
    with client(gs, ALICE) as c:
        run = c.post(f"{RUN_REQ}/{submitted['request_id']}/compose", json={"output_format": "avif"})
    assert run.status_code == 200, run.text
    assert run.json()["image"]["content_type"] == "image/avif"
    assert masks_total(metrics_port, "network") == network0 + 2


def test_compose_refuses_what_it_cannot_reuse(gs):
    image = photo(7)
    source = output(gs, ALICE, {"image_url": image})
    with client(gs, ALICE) as c, client(gs, BOB) as b:
        unknown = c.post(f"{REQ}/8f1d2c9e-4b0a-4d8e-9f31-2a7c5e0b6d11/compose", json={})
        assert unknown.status_code == 404 and unknown.json() == {"detail": "Request not found"}
        others = b.post(f"{REQ}/{source['id']}/compose", json={"background_color": "#ffffff"})
        assert others.status_code == 404 and others.json() == {"detail": "Request not found"}
        sync_source = c.post("/run/fal-ai/birefnet/v2", json={"image_url": image, "sync_mode": True})
        sync_id = sync_source.headers["x-fal-request-id"]
        nothing_kept = c.post(f"{REQ}/{sync_id}/compose", json={})
        assert nothing_kept.status_code == 404 and "no kept mask" in nothing_kept.json()["detail"]
    with client(gs, ALICE) as c:
        rid = c.post(f"{REQ}/{source['id']}/compose", json={"background_color": "nope"}).json()["request_id"]
    status, result = outcome(gs, ALICE, rid)
    assert result.status_code == 422 and result.json()["detail"][0]["loc"] == ["body", "background_color"]


def test_content_cache_is_per_key_unless_shared_and_spans_bucket_uploads(gs, metrics_port):
    image = png_bytes((100, 70), color=(28, 30, 90))  # its recipe-weights mask has a subject at 0.5
    network0, cache0 = masks_total(metrics_port, "network"), masks_total(metrics_port, "cache")
    output(gs, CAROL, {"image_url": data_uri(image)})
    output(gs, DAVE, {"image_url": data_uri(image), "background_color": "#ffffff"})  # shared with carol
    assert (masks_total(metrics_port, "network"), masks_total(metrics_port, "cache")) == (
        network0 + 1,
        cache0 + 1,
    )
    output(gs, ALICE, {"image_url": data_uri(image)})  # alice's own scope: computed again
    assert masks_total(metrics_port, "network") == network0 + 2

    # A bucket upload of the same bytes (uploads scope 'shared' here) reuses the mask too, with the
    # extension fields from x-amz-meta-* and the products/ prefix defaults (white, jpeg, crop).
    settings = gs.settings
    s3 = boto3.client(
        "s3", region_name=settings.aws_region, endpoint_url=settings.s3_endpoint_url, config=boto_config()
    )
    s3.put_object(
        Bucket=settings.input_bucket,
        Key="products/shoe.png",
        Body=image,
        ContentType="image/png",
        Metadata={"crop_margin": "12", "crop_aspect_ratio": "1:1"},
    )
    prefix = f"{settings.output_prefix}uploads/products/shoe.png/"

    def result_document() -> dict | None:
        listing = s3.list_objects_v2(Bucket=settings.output_bucket, Prefix=prefix).get("Contents", [])
        keys = [o["Key"] for o in listing if o["Key"].endswith("/result.json")]
        return (
            json.loads(s3.get_object(Bucket=settings.output_bucket, Key=keys[0])["Body"].read())
            if keys
            else None
        )

    document = wait_for(result_document, 120, "the upload's result document")
    assert "image" in document and document["image"]["content_type"] == "image/jpeg", document
    assert document["image"]["width"] == document["image"]["height"], "crop_aspect_ratio 1:1 from metadata"
    assert masks_total(metrics_port, "network") == network0 + 2, "the upload reused the shared mask"
    assert masks_total(metrics_port, "cache") == cache0 + 2

    s3.put_object(
        Bucket=settings.input_bucket,
        Key="products/bad.png",
        Body=image,
        Metadata={"background_color": "white"},
    )
    bad = wait_for(
        lambda: s3.list_objects_v2(
            Bucket=settings.output_bucket, Prefix=f"{settings.output_prefix}uploads/products/bad.png/"
        ).get("Contents"),
        120,
        "the bad upload's error document",
    )
    error = json.loads(s3.get_object(Bucket=settings.output_bucket, Key=bad[0]["Key"])["Body"].read())
    assert error["detail"][0]["loc"] == ["body", "background_color"]


# --- fal's Python client passes the extension fields through ------------------------------------------
@pytest.mark.timeout(300)
def test_python_client_with_extension_arguments_and_compose(gs):
    got = run_client(
        gs,
        f"""
        image = {photo(8)!r}
        first = fal_client.subscribe(APP, arguments={{"image_url": image, "background_color": "#ffffff",
                                                      "output_format": "jpeg", "crop_to_subject": True}})
        handle = fal_client.submit(APP, arguments={{"image_url": image}})
        handle.get()
        composed = fal_client.run("fal-ai/birefnet", path=f"/requests/{{handle.request_id}}/compose",
                                  arguments={{"output_format": "avif", "background_color": "#00000080"}})
        queued = fal_client.subscribe("fal-ai/birefnet", path=f"/requests/{{handle.request_id}}/compose",
                                      arguments={{"crop_to_subject": True, "crop_margin": "10%"}})
        try:
            fal_client.run(APP, arguments={{"image_url": image, "background_color": "#zzzzzz"}})
            error = None
        except FalClientHTTPError as exc:
            error = {{"status": exc.status_code, "message": exc.message}}
        out({{"first": first, "composed": composed, "queued": queued, "error": error}})
    """,
    )
    assert got["first"]["image"]["content_type"] == "image/jpeg"
    assert got["composed"]["image"]["content_type"] == "image/avif"
    first, queued = got["first"]["image"], got["queued"]["image"]  # one mask: margin 0, then 10 % each side
    assert queued["content_type"] == "image/png"
    assert (queued["width"], queued["height"]) == (
        first["width"] + 2 * round(first["width"] / 10),
        first["height"] + 2 * round(first["height"] / 10),
    )
    assert got["error"]["status"] == 422 and "background_color" in json.dumps(got["error"]["message"])


def test_openapi_documents_the_extension_fields_and_compose(gs):
    with client(gs, ALICE) as c:
        document = c.get("/openapi.json").json()
    schemas = document["components"]["schemas"]
    for name in ("BiRefNetInput", "BiRefNetV2Input", "ComposeInput"):
        assert {
            "background_color",
            "background_image_url",
            "background_fit",
            "crop_to_subject",
            "crop_margin",
            "crop_aspect_ratio",
            "crop_threshold",
        } <= set(schemas[name]["properties"]), name
    assert list(schemas["BiRefNetV2Input"]["properties"])[0] == "image_url", "fal's fields first"
    for path in (
        "/queue/fal-ai/birefnet/requests/{request_id}/compose",
        "/run/fal-ai/birefnet/requests/{request_id}/compose",
    ):
        body = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        assert body["schema"] == {"$ref": "#/components/schemas/ComposeInput"} and body["examples"], path
    submit_examples = document["paths"]["/queue/fal-ai/birefnet/v2"]["post"]["requestBody"]["content"][
        "application/json"
    ]["examples"]
    assert any("background_color" in example["value"] for example in submit_examples.values())
