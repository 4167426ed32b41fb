"""A private local stack on loopback: Redis, S3+SQS (moto), producer, webhook deliverer, worker(s).

Used by `make up` (foreground) and `make demo`. Ports and names come from settings
(BIREFNET_DEV_* for the stack's own ports, BIREFNET_* for the rest).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from common.settings import Settings
from devstack.services import MotoServer, RedisServer, provision_aws, stack_environment

ROOT = Path(__file__).resolve().parent.parent


class DevStackSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BIREFNET_DEV_", extra="ignore")

    redis_port: int = Field(6390, description="Port of the local stack's redis-server.")
    aws_port: int = Field(5390, description="Port of the local stack's S3+SQS endpoint (moto).")
    worker_variants: str = Field("general-heavy", description="Variants the local stack's worker serves.")
    weights_fallback: str = Field("recipe", description="The local stack falls back to recipe weights, loudly.")


class LocalStack:
    def __init__(self, dev: DevStackSettings | None = None, log_dir: Path | None = None):
        self.dev = dev or DevStackSettings()
        self.log_dir = log_dir or Path(tempfile.mkdtemp(prefix="birefnet-stack-"))
        self.redis = RedisServer(port=self.dev.redis_port, data_dir=str(self.log_dir / "redis"))
        self.aws = MotoServer(port=self.dev.aws_port)
        self.processes: dict[str, subprocess.Popen] = {}
        self.env: dict[str, str] = {}
        self.settings: Settings | None = None

    def start(self, *, with_worker: bool = True) -> LocalStack:
        (self.log_dir / "redis").mkdir(parents=True, exist_ok=True)
        self.redis.start()
        self.aws.start()
        base = stack_environment(self.redis.url, self.aws.url, "", {
            "BIREFNET_WEIGHTS_FALLBACK": self.dev.weights_fallback,
            "BIREFNET_READY_FILE": str(self.log_dir / "worker.ready"),
        })
        settings = Settings(**{"redis_url": self.redis.url, "s3_endpoint_url": self.aws.url,
                               "sqs_endpoint_url": self.aws.url})
        provisioned = provision_aws(settings)
        base["BIREFNET_SQS_QUEUE_URL"] = provisioned.queue_url
        self.env = base
        self.settings = settings.model_copy(update={"sqs_queue_url": provisioned.queue_url})
        self._spawn("producer", ["-m", "producer", "sqs"])
        self._spawn("webhooks", ["-m", "producer", "webhooks", "--concurrency", "2"])
        if with_worker:
            self._spawn("worker", ["-m", "worker", "--variants", self.dev.worker_variants])
        return self

    def _spawn(self, name: str, args: list[str]) -> None:
        handle = open(self.log_dir / f"{name}.log", "w")  # noqa: SIM115 - lives as long as the process
        self.processes[name] = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=self.env,
                                                stdout=handle, stderr=subprocess.STDOUT)

    def wait_worker_ready(self, timeout: float = 300) -> None:
        ready = self.log_dir / "worker.ready"
        deadline = time.time() + timeout
        while not ready.exists():
            proc = self.processes["worker"]
            if proc.poll() is not None:
                raise RuntimeError(f"the worker exited; see {self.log_dir / 'worker.log'}:\n{self.tail('worker')}")
            if time.time() > deadline:
                raise TimeoutError("the worker did not become ready")
            time.sleep(0.2)

    def tail(self, name: str, lines: int = 30) -> str:
        path = self.log_dir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def stop(self) -> None:
        for proc in self.processes.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.processes.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.aws.stop()
        self.redis.stop()
