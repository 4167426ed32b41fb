"""The one way to start a loopback stack's service processes, shared by `make up`, the tests and the
benchmarks.

`build_stack` makes a stack's environment (the caller's, the stack's endpoints, then the given values), its
settings as the child processes read them, and its buckets and event queue; `Stack` starts the services
(`python -m gateway|producer|deliverer|worker`) with exactly that environment, one log file each, and stops
them. The caller's os.environ is never written.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.settings import Settings
from devstack.services import (
    ROOT,
    provision_aws,
    settings_from,
    spawn_python,
    stack_environment,
    stop_processes,
)
from devstack.tls import TlsFiles

T = TypeVar("T")


def wait_for(predicate: Callable[[], T | None], timeout: float, what: str, interval: float = 0.1) -> T:
    """The first truthy value of `predicate`, polled every `interval` s; TimeoutError after `timeout` s."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def signing_seed() -> str:
    """A fresh Ed25519 seed for BIREFNET_WEBHOOK_SIGNING_KEYS (hex)."""
    return (
        Ed25519PrivateKey.generate()
        .private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        .hex()
    )


def worker_command(variants: str, module: str = "worker") -> list[str]:
    """The arguments after `python` that start a worker serving `variants` (comma-separated ids)."""
    return ["-m", module, "--variants", variants]


@dataclass
class Stack:
    """Settings and environment of one private stack, and the service processes started with them."""

    settings: Settings
    env: dict[str, str]
    log_dir: Path
    processes: list[subprocess.Popen] = field(default_factory=list)
    named: dict[str, subprocess.Popen] = field(default_factory=dict)  # log name -> process
    logs: list[Path] = field(default_factory=list)
    worker_module: str = "worker"  # what `python -m` runs for a worker
    root: Path = ROOT  # the checkout the processes run from

    def start(
        self, args: list[str], name: str, extra_env: Mapping[str, str] | None = None
    ) -> subprocess.Popen:
        """`python <args>` with the stack's environment (plus `extra_env`), logging to
        `<log_dir>/<name>.log`."""
        log_path = self.log_dir / f"{name}.log"
        proc = spawn_python(args, {**self.env, **(extra_env or {})}, log_path, self.root)
        self.processes.append(proc)
        self.named[name] = proc
        self.logs.append(log_path)
        return proc

    def start_gateway(
        self,
        port: int | None = None,
        tls: TlsFiles | None = None,
        name: str = "gateway",
        extra_env: Mapping[str, str] | None = None,
    ) -> subprocess.Popen:
        """The gateway on 127.0.0.1 (`port`: else the stack's BIREFNET_GATEWAY_PORT), HTTPS with `tls`."""
        env = {"BIREFNET_GATEWAY_HOST": "127.0.0.1", **({"BIREFNET_GATEWAY_PORT": str(port)} if port else {})}
        if tls is not None:
            env |= {"BIREFNET_GATEWAY_TLS_CERT": str(tls.cert), "BIREFNET_GATEWAY_TLS_KEY": str(tls.key)}
        return self.start(["-m", "gateway"], name, {**env, **(extra_env or {})})

    def start_producer(self, name: str = "producer") -> subprocess.Popen:
        """The SQS event producer."""
        return self.start(["-m", "producer", "sqs"], name)

    def start_deliverer(self, concurrency: int = 2, name: str = "webhooks") -> subprocess.Popen:
        """The webhook deliverer."""
        return self.start(["-m", "deliverer", "--concurrency", str(concurrency)], name)

    def ready_file(self, name: str) -> Path:
        """Where worker `name` says it is ready (BIREFNET_READY_FILE)."""
        return self.log_dir / f"{name}.ready"

    def start_worker(
        self,
        variants: str = "general-light",
        name: str | None = None,
        extra_env: Mapping[str, str] | None = None,
        wait: bool = True,
        timeout: float = 120,
    ) -> subprocess.Popen:
        """A worker serving `variants`; with `wait`, returns once it is ready (AssertionError if it exits)."""
        name = name or f"worker-{variants}-{len(self.processes)}"
        ready = self.ready_file(name)
        proc = self.start(
            worker_command(variants, self.worker_module),
            name,
            {"BIREFNET_READY_FILE": str(ready), **(extra_env or {})},
        )
        if wait:
            self.wait_ready(name, timeout)
        return proc

    def wait_ready(self, name: str, timeout: float = 120) -> None:
        """Until worker `name` has written its ready file (AssertionError with its log if it exits first)."""
        proc, ready = self.named[name], self.ready_file(name)
        wait_for(lambda: ready.exists() or proc.poll() is not None, timeout, f"worker {name} ready")
        assert proc.poll() is None, self.tail(name)

    def tail(self, name: str, lines: int = 60) -> str:
        path = self.log_dir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def stop_all(self) -> None:
        stop_processes(self.processes)


def build_stack(
    redis_url: str,
    s3_url: str,
    values: Mapping[str, str],
    *,
    log_dir: Path,
    environ: Mapping[str, str],
    queue_name: str = "birefnet-input-events",
    sqs_url: str | None = None,
    dotenv: bool = False,
    root: Path = ROOT,
) -> Stack:
    """Environment (`values` over `environ`), settings, buckets and event queue of one stack. `sqs_url`
    (default: `s3_url`) lets S3 go through a proxy; `dotenv`: the settings also read .env, as `make up` does;
    `root`: the checkout the processes run from."""
    env = stack_environment(environ, redis_url, s3_url, values)
    env["BIREFNET_SQS_ENDPOINT_URL"] = sqs_url or s3_url
    settings = settings_from(env, dotenv=dotenv)
    queue = provision_aws(settings, env, queue_name=queue_name)
    env["BIREFNET_SQS_QUEUE_URL"] = queue.queue_url
    log_dir.mkdir(parents=True, exist_ok=True)
    return Stack(
        settings=settings.model_copy(update={"sqs_queue_url": queue.queue_url}),
        env=env,
        log_dir=log_dir,
        root=root,
    )
