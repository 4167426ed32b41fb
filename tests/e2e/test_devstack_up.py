"""`python -m devstack up` as a newcomer runs it (`make up`), and the README's examples against it, as
written.

Real processes throughout: the stack (Redis, moto, producer, webhooks, gateway, one worker packing every
fal model), fal's Python client in a subprocess, fal's JS client under Node (installed by the Makefile into
tests/js; skipped without npm). Every fal model is overridden to the nano test network with recipe weights
and run at 64x64 (BIREFNET_TEST_OPERATING_RESOLUTION), so the whole run takes a minute or two on CPU.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from common.domain.variants import BUILTIN_VARIANTS
from devstack.services import free_port
from tests.helpers.images import png_bytes
from tests.helpers.servers import FileServer
from tests.helpers.stack import ROOT, wait_for

FAL_MODELS = [v for v in BUILTIN_VARIANTS if v.fal_names]
JS_MODULES = ROOT / "tests" / "js" / "node_modules"
README = (ROOT / "README.md").read_text()


def readme_example(kind: str) -> str:
    match = re.search(rf"<!-- example: make-up {kind} -->\n```\w+\n(.*?)\n```", README, re.S)
    assert match, f"README has no make-up {kind} example"
    return match.group(1)


class Up:
    """`python -m devstack up` in its own process group, its output collected line by line."""

    def __init__(self, env: dict[str, str]):
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "devstack", "up"],
            cwd=ROOT,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def export_line(self, after: str) -> dict[str, str]:
        """The `export K=V ...` line printed under the heading `after`."""
        index = next(i for i, line in enumerate(self.lines) if line.startswith(after))
        line = self.lines[index + 1].strip()
        assert line.startswith("export "), line
        return dict(item.split("=", 1) for item in line.removeprefix("export ").split())

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # Ctrl-C, as a user stops it
            try:
                return self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.wait(timeout=10)


def stack_env(**extra: str) -> dict[str, str]:
    overrides = {v.id: {"backbone": "swin_v1_nano", "weights": "recipe"} for v in FAL_MODELS}
    env = {key: value for key, value in os.environ.items() if not key.startswith("BIREFNET_")}
    return {
        **env,
        "BIREFNET_DEV_REDIS_PORT": str(free_port()),
        "BIREFNET_DEV_AWS_PORT": str(free_port()),
        "BIREFNET_DEV_GATEWAY_PORT": str(free_port()),
        "BIREFNET_VARIANT_OVERRIDES": json.dumps(overrides),
        "BIREFNET_TEST_OPERATING_RESOLUTION": "64x64",
        "BIREFNET_TORCH_THREADS": "1",
        **extra,
    }


@pytest.fixture(scope="module")
def up() -> Up:
    running = Up(stack_env())
    try:
        wait_for(
            lambda: "all workers ready" in running.text or running.proc.poll() is not None,
            300,
            "make up to report every worker ready",
            interval=0.5,
        )
        assert running.proc.poll() is None, running.text
        yield running
    finally:
        code = running.stop()
        assert code == 0, running.text


def test_up_prints_each_variant_and_worker_ready_and_the_client_lines(up: Up):
    for variant in FAL_MODELS:
        assert re.search(rf"worker: variant {variant.id} loaded in [\d.]+s", up.text), variant.id
    ready = next(line for line in up.lines if "worker READY: serves" in line)
    assert set(ready.split("serves ", 1)[1].split(", ")) == {v.id for v in FAL_MODELS}
    python = up.export_line("Python (fal_client)")
    assert python["FAL_KEY"] == "dev" and python["FAL_QUEUE_RUN_HOST"].endswith("/queue")
    assert Path(python["SSL_CERT_FILE"]).is_file()
    js = up.export_line("JavaScript (@fal-ai/client")
    assert js["NODE_EXTRA_CA_CERTS"] == python["SSL_CERT_FILE"] and js["GATEWAY_URL"].startswith(
        "https://127.0.0.1:"
    )
    assert "image URLs       may point at 127.0.0.1" in up.text


@pytest.mark.timeout(400)
def test_readme_python_example_runs_as_written_for_every_model(up: Up, tmp_path):
    script = tmp_path / "first.py"
    script.write_text(readme_example("python"))
    env = {**os.environ, **up.export_line("Python (fal_client)")}
    done = subprocess.run(
        [sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=360
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = [line.split() for line in done.stdout.splitlines() if line.startswith("fal-ai/birefnet")]
    pairs = {(fields[0], " ".join(fields[1:-2])) for fields in results}
    assert pairs == {
        ("fal-ai/birefnet" if endpoint == "v1" else "fal-ai/birefnet/v2", name)
        for v in FAL_MODELS
        for endpoint, name in v.fal_names.items()
    }
    assert len(pairs) == len(results) == 9
    trust = ssl.create_default_context(cafile=env["SSL_CERT_FILE"])
    for fields in results:
        image_url, mask_url = fields[-2:]
        for url in (image_url, mask_url):
            assert httpx.get(url, verify=trust, timeout=30).content[:4] == b"\x89PNG"


@pytest.mark.timeout(400)
def test_readme_js_example_runs_as_written(up: Up, tmp_path):
    node = shutil.which("node")
    if not node or not (JS_MODULES / "@fal-ai" / "client").is_dir():
        pytest.skip("node or tests/js/node_modules missing (make test installs @fal-ai/client with npm)")
    (tmp_path / "node_modules").symlink_to(JS_MODULES)  # as after `npm install @fal-ai/client`
    script = tmp_path / "first.mjs"
    script.write_text(readme_example("js"))
    env = {**os.environ, **up.export_line("JavaScript (@fal-ai/client")}
    done = subprocess.run([node, str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=360)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    urls = re.findall(r"^(.+) (https?://127\.0\.0\.1:\d+/\S+)$", done.stdout, re.M)
    assert [model for model, _ in urls] == [v.fal_names["v2"] for v in FAL_MODELS if "v2" in v.fal_names]


def submit_and_wait(gateway: str, ca: str, image_url: str) -> tuple[dict, dict]:
    """(final status, result body) of one v2 request through the stack's gateway."""
    verify = ssl.create_default_context(cafile=ca)
    with httpx.Client(
        base_url=gateway, headers={"Authorization": "Key dev"}, verify=verify, timeout=30
    ) as client:
        rid = client.post(
            "/queue/fal-ai/birefnet/v2", json={"image_url": image_url, "model": "General Use (Heavy)"}
        ).json()["request_id"]

        def completed() -> dict | None:
            body = client.get(f"/queue/fal-ai/birefnet/requests/{rid}/status").json()
            return body if body["status"] == "COMPLETED" else None

        status = wait_for(completed, 180, "the request to complete", interval=0.2)
        return status, client.get(f"/queue/fal-ai/birefnet/requests/{rid}").json()


def test_loopback_image_urls_work_by_default(up: Up):
    server = FileServer({"/cat.png": (png_bytes((40, 24)), "image/png")})
    try:
        python = up.export_line("Python (fal_client)")
        status, result = submit_and_wait(
            f"https://{python['FAL_QUEUE_RUN_HOST'].removesuffix('/queue')}",
            python["SSL_CERT_FILE"],
            server.url("/cat.png"),
        )
        assert "error" not in status, status
        assert (result["image"]["width"], result["image"]["height"]) == (40, 24)
    finally:
        server.server.shutdown()


@pytest.mark.timeout(400)
def test_loopback_image_urls_can_be_switched_off(tmp_path):
    """BIREFNET_DEV_ALLOW_LOOPBACK_URLS=false: a job whose image URL is on 127.0.0.1:<port> fails, as in
    production."""
    from devstack.stack import DevStackSettings, LocalStack

    server = FileServer({"/cat.png": (png_bytes((40, 24)), "image/png")})
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(stack_env(BIREFNET_DEV_ALLOW_LOOPBACK_URLS="false"))
    try:
        stack = LocalStack(DevStackSettings(), log_dir=tmp_path)
        stack.start(variants="general-heavy")
    finally:
        os.environ.clear()
        os.environ.update(saved)
    try:
        assert "BIREFNET_FETCH_ALLOW_NETWORKS" not in stack.env
        stack.wait_worker_ready(timeout=240)
        status, result = submit_and_wait(stack.gateway_url, str(stack.tls.ca), server.url("/cat.png"))
        assert status.get("error"), status
        (detail,) = result["detail"]  # the production SSRF guard's answer, fal's file_download_error
        assert detail["type"] == "file_download_error" and "not allowed" in detail["msg"], result
    finally:
        stack.stop()
        server.server.shutdown()
