"""The built images, started: `make images-smoke` (skipped unless BIREFNET_IMAGES_SMOKE=1).

The app image's gateway, producer (SQS mode, S3 events from moto) and webhook deliverer and the worker
image's worker (CPU, untrained recipe weights of the nano architecture) run as podman containers on the
host network against a redis-server and a moto server on 127.0.0.1. One upload goes through the input
bucket's S3 events and one request through the fal-compatible queue API; the cut-outs, masks and
webhooks are checked as a user would. Images come from `make images` (infra/docker/images.sh), whose
podman configuration under IMAGES_DIR this reuses.
"""

from __future__ import annotations

import io
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image
from skimage import data as samples

from devstack.receiver import WebhookReceiver
from devstack.services import free_port
from tests.helpers.gateway import ALICE, api_keys_setting, auth, signing_seed
from tests.helpers.images import array_png, data_uri
from tests.helpers.pipeline import s3_client
from tests.helpers.stack import build_stack, isolated_settings, wait_for

pytestmark = pytest.mark.skipif(
    os.environ.get("BIREFNET_IMAGES_SMOKE") != "1",
    reason="builds on `make images`; run with `make images-smoke`",
)

IMAGES_DIR = Path(os.environ.get("IMAGES_DIR", "/var/tmp/birefnet-images"))
TAG = os.environ.get("IMAGE_TAG", "0.1.0")
APP, WORKER = f"localhost/birefnet-app:{TAG}", f"localhost/birefnet-worker:{TAG}"
UID = "10001"


class Containers:
    """podman containers on the host network, removed at the end whatever happened."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.names: list[str] = []
        self.podman_env = {
            **os.environ,
            "CONTAINERS_CONF": str(IMAGES_DIR / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(IMAGES_DIR / "storage.conf"),
        }

    def podman(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["podman", *args], env=self.podman_env, capture_output=True, text=True, check=check, timeout=120
        )

    def start(self, name: str, image: str, *command: str, extra: dict[str, str] | None = None) -> str:
        full = f"smoke-{name}-{os.getpid()}"
        env_args = [
            arg for key, value in {**self.env, **(extra or {})}.items() for arg in ("--env", f"{key}={value}")
        ]
        self.podman("run", "--detach", "--name", full, "--network=host", *env_args, image, *command)
        self.names.append(full)
        return full

    def logs(self, name: str) -> str:
        result = self.podman("logs", name, check=False)
        return result.stdout + result.stderr

    def running(self, name: str) -> bool:
        return (
            self.podman("inspect", "--format", "{{.State.Running}}", name, check=False).stdout.strip()
            == "true"
        )

    def remove_all(self) -> None:
        for name in self.names:
            self.podman("rm", "--force", "--time", "5", name, check=False)


@pytest.fixture
def containers(redis_server, moto_endpoint, tmp_path) -> Iterator[tuple[Containers, object, int]]:
    suffix, redis_url, values = isolated_settings(redis_server.port, tmp_path)
    gateway_port = free_port()
    values |= {
        "BIREFNET_GATEWAY_API_KEYS": api_keys_setting(f"in-{suffix}"),
        "BIREFNET_GATEWAY_HOST": "127.0.0.1",
        "BIREFNET_GATEWAY_PORT": str(gateway_port),
        "BIREFNET_FETCH_ALLOW_NETWORKS": "127.0.0.0/8",
        "BIREFNET_WEBHOOK_SIGNING_KEYS": signing_seed(),
        "BIREFNET_DEVICE": "cpu",
        # The network runs at 256x256 whatever the request says (logged): a job takes a fraction of a second.
        "BIREFNET_TEST_OPERATING_RESOLUTION": "256x256",
    }
    stack = build_stack(redis_url, moto_endpoint, values, queue_name=f"events-{suffix}")
    # Only the service's own settings and the AWS credentials enter the containers (no host paths).
    env = {
        key: value
        for key, value in stack.env.items()
        if (key.startswith(("BIREFNET_", "AWS_")) and key != "BIREFNET_TEST_LOG_DIR")
    }
    pods = Containers(env)
    try:
        yield pods, stack.settings, gateway_port
    finally:
        for name in pods.names:
            (tmp_path / f"{name}.log").write_text(pods.logs(name))
        pods.remove_all()


@pytest.mark.timeout(600)
def test_images_serve_an_upload_and_an_api_request(containers, webhook_receiver: WebhookReceiver):
    pods, settings, gateway_port = containers
    started = time.monotonic()
    assert pods.podman("run", "--rm", APP, "python", "-c", "import torch", check=False).returncode != 0, (
        "the app image must not carry torch"
    )
    gateway = pods.start("gateway", APP)
    producer = pods.start("producer", APP, "python", "-m", "producer", "sqs")
    deliverer = pods.start("deliverer", APP, "python", "-m", "deliverer")
    worker = pods.start("worker", WORKER)
    for name in (gateway, producer, deliverer, worker):
        assert pods.podman("exec", name, "id", "-u").stdout.strip() == UID, f"{name} runs as non-root"

    wait_for(
        lambda: (
            pods.podman("exec", worker, "test", "-f", settings.ready_file, check=False).returncode == 0
            or not pods.running(worker)
        ),
        300,
        "the worker container to load its model",
    )
    assert pods.running(worker), pods.logs(worker)
    worker_log = pods.logs(worker)
    assert "untrained" in worker_log.lower(), "the worker must say it serves no trained model"

    # 1. An upload to the input bucket, through S3 events, SQS, the producer, the worker and a webhook.
    photo = samples.astronaut()  # 512x512 RGB
    s3_client(settings).put_object(
        Bucket=settings.input_bucket,
        Key="photos/astronaut.png",
        Body=array_png(photo),
        ContentType="image/png",
        Metadata={"output_mask": "true", "webhook_url": webhook_receiver.url, "output_format": "png"},
    )
    (delivery,) = webhook_receiver.wait(1, timeout=240)
    body = delivery.json()
    assert body["status"] == "OK", (body, pods.logs(worker)[-3000:])
    check_outputs(body["payload"], (512, 512))

    # 2. A request through the fal-compatible queue API, with a webhook.
    base = f"http://127.0.0.1:{gateway_port}"
    wait_for(lambda: _up(base), 60, "the gateway container")
    coffee = Image.fromarray(samples.coffee())  # 600x400
    with httpx.Client(base_url=base, headers=auth(ALICE), timeout=30) as client:
        submitted = client.post(
            "/queue/fal-ai/birefnet/v2",
            params={"fal_webhook": webhook_receiver.url},
            json={"image_url": data_uri(_png(coffee)), "output_mask": True},
        )
        assert submitted.status_code == 200, submitted.text
        request_id = submitted.json()["request_id"]
        deliveries = webhook_receiver.wait(2, timeout=240)
        hook = next(d.json() for d in deliveries if d.json().get("request_id") == request_id)
        assert hook["status"] == "OK", hook
        status = client.get(f"/queue/fal-ai/birefnet/requests/{request_id}/status").json()
        assert status["status"] == "COMPLETED", status
        result = client.get(f"/queue/fal-ai/birefnet/requests/{request_id}").json()
    check_outputs(result, coffee.size)
    print(
        f"\nimages smoke: both paths served in {time.monotonic() - started:.1f} s (containers started to "
        f"webhooks)"
    )


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _up(base: str) -> bool:
    try:
        return httpx.get(f"{base}/healthz", timeout=2).status_code < 500
    except httpx.HTTPError:
        return False


def check_outputs(payload: dict, size: tuple[int, int]) -> None:
    """The cut-out is an RGBA PNG of the input's size, with some transparent and some opaque pixels; the
    mask is a one-channel PNG of the same size."""
    cutout = Image.open(io.BytesIO(httpx.get(payload["image"]["url"]).content))
    assert cutout.format == "PNG" and cutout.mode == "RGBA" and cutout.size == size
    alpha = cutout.getchannel("A").getextrema()
    assert alpha[0] < 128 < alpha[1], f"alpha {alpha}: no subject cut out"
    mask = Image.open(io.BytesIO(httpx.get(payload["mask_image"]["url"]).content))
    assert mask.format == "PNG" and mask.mode == "L" and mask.size == size
