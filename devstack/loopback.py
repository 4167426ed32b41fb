"""A throwaway loopback stack for load runs and the chaos tests: its own redis-server (AOF, `appendfsync
always`), S3 and SQS on a given moto endpoint, the gateway over HTTP with one API key, the SQS producer, the
webhook deliverer and nano workers, all started through devstack's builder. Short timeouts, so that failures
heal fast; every process binds 127.0.0.1 only."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis

from common.domain.auth import hash_secret
from common.settings import Settings
from common.state.jobs import JobStore
from devstack.builder import Stack, build_stack, signing_seed, wait_for
from devstack.services import ROOT, RedisServer, aws_client, free_port

# The nano architecture with recipe weights: fast on CPU, the same code path as real checkpoints.
NANO_VARIANTS = {
    "general-light": {"backbone": "swin_v1_nano", "weights": "recipe"},
    "general-heavy": {"backbone": "swin_v1_nano", "weights": "recipe"},
}
VARIANT = "general-light"  # what the stack's workers serve


def loopback_values(**overrides: str) -> dict[str, str]:
    """Settings of a loopback stack: nano model at 128x128, short timeouts so failures heal fast."""
    values = {
        "BIREFNET_VARIANT_OVERRIDES": json.dumps(NANO_VARIANTS),
        "BIREFNET_WEIGHTS_FALLBACK": "none",
        "BIREFNET_TEST_OPERATING_RESOLUTION": "128x128",
        "BIREFNET_MASK_CACHE_SECONDS": "0",  # every job runs the network: the load is what it says
        "BIREFNET_TORCH_THREADS": "1",
        "BIREFNET_JOB_LEASE_SECONDS": "6",
        "BIREFNET_SQS_WAIT_SECONDS": "1",
        "BIREFNET_FETCH_ALLOW_NETWORKS": "127.0.0.0/8",
        "BIREFNET_FETCH_ALLOWED_PORTS": "*",
        "BIREFNET_WEBHOOK_TIMEOUT": "5",
        "BIREFNET_WEBHOOK_RETRY_BASE": "0.5",
        "BIREFNET_WEBHOOK_RETRY_MAX_DELAY": "2",
        "BIREFNET_WEBHOOK_MAX_RETRIES": "10",
        "BIREFNET_WEBHOOK_SIGNING_KEYS": signing_seed(),
        "BIREFNET_ALLOW_DEV_SECRETS": "true",  # a throwaway stack: the gateway's secret lives in its Redis
        # Several processes of a kind on one host (and other runs): no fixed metrics ports.
        "BIREFNET_WORKER_METRICS_PORT": "0",
        "BIREFNET_PRODUCER_METRICS_PORT": "0",
        "BIREFNET_WEBHOOKS_METRICS_PORT": "0",
    }
    values.update(overrides)
    return values


@dataclass
class LoopbackStack:
    """Everything on loopback; `start()` brings up Redis, buckets/queue and the chosen services.
    `overrides` go over `loopback_values()`; the gateway's one key is `credential` (id:secret)."""

    log_dir: Path
    moto_url: str
    overrides: dict[str, str] = field(default_factory=dict)
    credential: str = "dev:dev-secret"
    root: Path = ROOT  # the checkout the services run from
    worker_module: str = "worker"  # what `python -m` runs for a worker
    redis: RedisServer = field(init=False)
    stack: Stack = field(init=False)
    settings: Settings = field(init=False)
    gateway_port: int = field(default_factory=free_port)
    workers: dict[str, subprocess.Popen] = field(default_factory=dict)  # log name -> process
    worker_starts: int = 0

    def api_keys(self, input_bucket: str) -> str:
        """BIREFNET_GATEWAY_API_KEYS of the stack: `credential`'s key."""
        key_id, secret = self.credential.split(":", 1)
        return json.dumps([{"id": key_id, "hash": hash_secret(secret, "sha256")}])

    def s3_url(self) -> str:
        """Where the services reach S3 (moto itself here)."""
        return self.moto_url

    def start(
        self, *, workers: int = 2, gateway: bool = True, producer: bool = True, webhooks: bool = True
    ) -> LoopbackStack:
        (self.log_dir / "redis").mkdir(exist_ok=True)
        self.redis = RedisServer(data_dir=str(self.log_dir / "redis")).start()
        s3_url = self.s3_url()
        suffix = uuid.uuid4().hex[:8]
        values = loopback_values(
            **{
                "BIREFNET_INPUT_BUCKET": f"in-{suffix}",
                "BIREFNET_OUTPUT_BUCKET": f"out-{suffix}",
                "BIREFNET_GATEWAY_HOST": "127.0.0.1",
                "BIREFNET_GATEWAY_PORT": str(self.gateway_port),
                "BIREFNET_GATEWAY_API_KEYS": self.api_keys(f"in-{suffix}"),
                "BIREFNET_TEST_LOG_DIR": str(self.log_dir),
                **self.overrides,
            }
        )
        self.stack = build_stack(
            self.redis.url,
            s3_url,
            values,
            log_dir=self.log_dir,
            environ=os.environ,
            queue_name=f"events-{suffix}",
            sqs_url=self.moto_url,
            root=self.root,
        )
        self.stack.worker_module = self.worker_module
        self.settings = self.stack.settings
        self._versioned_output_and_quick_queue(self.stack.env["BIREFNET_SQS_QUEUE_URL"])
        if gateway:
            self.stack.start_gateway()
        if producer:
            self.stack.start_producer()
        if webhooks:
            self.stack.start_deliverer(concurrency=4)
        names = [self.start_worker(wait=False) for _ in range(workers)]
        for name in names:
            self.wait_ready(name)
        if gateway:
            wait_for(self.gateway_up, 60, "the gateway to answer")
        return self

    def _versioned_output_and_quick_queue(self, queue_url: str) -> None:
        """Output bucket versioning counts every write of a result document (a job done twice would
        leave two versions); a short SQS visibility timeout brings back events that failed quickly."""
        self.s3_direct().put_bucket_versioning(
            Bucket=self.settings.output_bucket, VersioningConfiguration={"Status": "Enabled"}
        )
        sqs = aws_client("sqs", self.moto_url, self.settings, self.stack.env)
        sqs.set_queue_attributes(QueueUrl=queue_url, Attributes={"VisibilityTimeout": "5"})

    # --- clients ---
    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    def gateway_up(self) -> bool:
        try:
            return httpx.get(f"{self.gateway_url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def store(self) -> JobStore:
        return JobStore(
            redis.Redis.from_url(
                self.settings.redis_url, decode_responses=True, socket_timeout=10, retry_on_timeout=True
            )
        )

    def s3_direct(self):
        """S3 as a user sees it (straight to moto)."""
        return aws_client("s3", self.moto_url, self.settings, self.stack.env)

    # --- workers ---
    def start_worker(self, wait: bool = True, extra_env: dict[str, str] | None = None) -> str:
        """Start one more worker process; returns its name (log file `<name>.log`)."""
        self.worker_starts += 1
        name = f"worker-{self.worker_starts}"
        self.workers[name] = self.stack.start_worker(VARIANT, name=name, extra_env=extra_env, wait=False)
        if wait:
            self.wait_ready(name)
        return name

    def wait_ready(self, name: str, timeout: float = 180) -> None:
        self.stack.wait_ready(name, timeout)

    def live_workers(self) -> list[subprocess.Popen]:
        return [p for p in self.workers.values() if p.poll() is None]

    def close(self) -> None:
        """Stop whatever `start()` got to start."""
        if hasattr(self, "stack"):
            self.stack.stop_all()
        if hasattr(self, "redis"):
            self.redis.stop()
