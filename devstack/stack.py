"""A private local stack on loopback: Redis, S3+SQS (moto), producer, webhook deliverer, worker(s), and the
fal-compatible gateway over HTTPS (certificate from a CA made for the stack, auth off).

Used by `make up` (foreground) and `make demo`. Ports and names come from settings (BIREFNET_DEV_* for the
stack's own ports, BIREFNET_* for the rest) and the environment the stack is given; it never writes
os.environ.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from common.settings import Settings
from devstack.builder import Stack, build_stack
from devstack.services import MotoServer, RedisServer, free_port
from devstack.tls import TlsFiles, make_tls

__all__ = ["DevStackSettings", "LocalStack", "TlsFiles", "hub_offline_reason", "make_tls", "worker_groups"]


class DevStackSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BIREFNET_DEV_", extra="ignore")

    redis_port: int = Field(6390, description="Port of the local stack's redis-server.")
    aws_port: int = Field(5390, description="Port of the local stack's S3+SQS endpoint (moto).")
    gateway_port: int = Field(
        8390, description="Port of the local stack's fal-compatible gateway (HTTPS, auth off)."
    )
    worker_variants: str = Field(
        "all",
        description="Variants the local stack's workers serve: comma-separated ids in one worker, `;` "
        "between workers (e.g. `general-light;matting,portrait`); `all`: every model of fal's v1 and v2 "
        "endpoints, "
        "packed into one worker.",
    )
    demo_variant: str = Field("general-heavy", description="Variant `make demo` runs (Swin-T: quick on CPU).")
    weights_fallback: str = Field(
        "recipe", description="The local stack falls back to recipe weights, loudly."
    )
    allow_loopback_urls: bool = Field(
        True,
        description="Let image URLs (and webhooks) reach 127.0.0.1 on any port, as the demo's own servers "
        "need; false: the production SSRF rules (public addresses, ports 80/443) apply to the local stack "
        "too.",
    )
    hub_probe_timeout: float = Field(
        3.0,
        description="Seconds to wait for Hugging Face (HF_ENDPOINT) before starting the workers offline "
        "(HF_HUB_OFFLINE=1: cached checkpoints, else the fallback) instead of retrying every download; 0: no "
        "probe.",
    )


def worker_groups(spec: str, settings: Settings) -> list[list[str]]:
    """`a,b;c` -> [[a, b], [c]]; `all` -> every variant that fal's endpoints name, in one worker."""
    every = [v.id for v in settings.variants if v.fal_names]
    groups = []
    for part in spec.split(";"):
        ids = [i.strip() for i in part.split(",") if i.strip()]
        ids = [x for i in ids for x in (every if i == "all" else [i])]
        if ids:
            groups.append(list(dict.fromkeys(ids)))
    for group in groups:
        for variant in group:
            settings.variants.get(variant)  # unknown ids fail here, with the list of known ones
    return groups


def hub_offline_reason(timeout: float, environ: Mapping[str, str]) -> str | None:
    """Why the workers (environment `environ`) should not try Hugging Face (None: reachable, or probing is off
    / already offline). Without this, each variant spends ~23 s in huggingface_hub's retries before its
    fallback when there is no network. A TCP connect to the hub's host within `timeout` counts as
    reachable."""
    if environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    if timeout <= 0:
        return None
    parsed = urlparse(environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = parsed.hostname or "huggingface.co", parsed.port or (80 if parsed.scheme == "http" else 443)
    outcome: list[str | None] = []

    def probe() -> None:  # getaddrinfo has no timeout of its own: run it in a thread we can give up on
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as exc:
            outcome.append(f"{host}:{port} unreachable ({exc})")

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return outcome[0] if outcome else f"{host}:{port} did not answer within {timeout:g} s"


class LocalStack:
    """`environ` (default: this process's, read once here) is what the stack's processes start from."""

    def __init__(
        self,
        dev: DevStackSettings | None = None,
        log_dir: Path | None = None,
        environ: Mapping[str, str] | None = None,
    ):
        self.dev = dev or DevStackSettings()
        self.environ = dict(os.environ if environ is None else environ)
        self.log_dir = log_dir or Path(tempfile.mkdtemp(prefix="birefnet-stack-"))
        self.redis = RedisServer(port=self.dev.redis_port, data_dir=str(self.log_dir / "redis"))
        self.aws = MotoServer(port=self.dev.aws_port)
        self.services: Stack | None = None
        self.tls: TlsFiles | None = None
        self.workers: dict[str, list[str]] = {}  # process name -> the variant ids it serves
        self.hub_offline_reason: str | None = None

    @property
    def gateway_url(self) -> str:
        return f"https://127.0.0.1:{self.dev.gateway_port}"

    @property
    def settings(self) -> Settings | None:
        return self.services.settings if self.services else None

    @property
    def env(self) -> dict[str, str]:
        return self.services.env if self.services else {}

    @property
    def processes(self) -> dict[str, subprocess.Popen]:
        """Process name -> process."""
        return self.services.named if self.services else {}

    def start(self, *, with_worker: bool = True, variants: str | None = None) -> LocalStack:
        """Everything, workers last. `variants` overrides `BIREFNET_DEV_WORKER_VARIANTS` (same syntax)."""
        (self.log_dir / "redis").mkdir(parents=True, exist_ok=True)
        self.redis.start()
        self.aws.start()
        # A development stack: signing keys generated into its own Redis are fine here (production refuses
        # them).
        extra = {"BIREFNET_WEIGHTS_FALLBACK": self.dev.weights_fallback, "BIREFNET_ALLOW_DEV_SECRETS": "true"}
        if self.dev.allow_loopback_urls:
            # The demo's webhook receiver and local image servers live on loopback, which production refuses.
            extra |= {"BIREFNET_FETCH_ALLOW_NETWORKS": "127.0.0.1/32", "BIREFNET_FETCH_ALLOWED_PORTS": "*"}
        services = self.services = build_stack(
            self.redis.url, self.aws.url, extra, log_dir=self.log_dir, environ=self.environ, dotenv=True
        )
        services.start_producer()
        services.start_deliverer(concurrency=2)
        self.tls = make_tls(self.log_dir)
        services.start_gateway(
            self.dev.gateway_port, self.tls, extra_env={"BIREFNET_GATEWAY_AUTH": "off"}
        )  # development mode: any FAL_KEY works
        if with_worker:
            self.hub_offline_reason = hub_offline_reason(self.dev.hub_probe_timeout, services.env)
            worker_env = {"HF_HUB_OFFLINE": "1"} if self.hub_offline_reason else {}
            for index, group in enumerate(
                worker_groups(variants or self.dev.worker_variants, services.settings)
            ):
                name = "worker" if index == 0 else f"worker{index + 1}"
                self.workers[name] = group
                services.start_worker(
                    ",".join(group),
                    name,
                    wait=False,
                    extra_env={**worker_env, "BIREFNET_WORKER_METRICS_PORT": str(free_port())},
                )
        return self

    def ready_file(self, worker: str) -> Path:
        return self.log_dir / f"{worker}.ready"

    def wait_worker_ready(self, timeout: float = 300) -> None:
        """Until every worker has written its ready file (raises if one exits first)."""
        deadline = time.time() + timeout
        while not all(self.ready_file(name).exists() for name in self.workers):
            for name in self.workers:
                if self.processes[name].poll() is not None:
                    raise RuntimeError(
                        f"{name} exited; see {self.log_dir / (name + '.log')}:\n{self.tail(name)}"
                    )
            if time.time() > deadline:
                raise TimeoutError("the workers did not become ready")
            time.sleep(0.2)

    def tail(self, name: str, lines: int = 30) -> str:
        return self.services.tail(name, lines) if self.services else ""

    def stop(self) -> None:
        if self.services is not None:
            self.services.stop_all()
        self.aws.stop()
        self.redis.stop()
