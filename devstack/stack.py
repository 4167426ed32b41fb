"""A private local stack on loopback: Redis, S3+SQS (moto), producer, webhook deliverer, worker(s), and the
fal-compatible gateway over HTTPS (certificate from a CA made for the stack, auth off).

Used by `make up` (foreground) and `make demo`. Ports and names come from settings (BIREFNET_DEV_* for the
stack's own ports, BIREFNET_* for the rest) and the environment the stack is given; it never writes os.environ.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from common.settings import Settings
from devstack.services import (
    MotoServer,
    RedisServer,
    free_port,
    provision_aws,
    settings_from,
    spawn_python,
    stack_environment,
    stop_processes,
)


class DevStackSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BIREFNET_DEV_", extra="ignore")

    redis_port: int = Field(6390, description="Port of the local stack's redis-server.")
    aws_port: int = Field(5390, description="Port of the local stack's S3+SQS endpoint (moto).")
    gateway_port: int = Field(8390, description="Port of the local stack's fal-compatible gateway (HTTPS, auth off).")
    worker_variants: str = Field(
        "all", description="Variants the local stack's workers serve: comma-separated ids in one worker, `;` "
        "between workers (e.g. `general-light;matting,portrait`); `all`: every model of fal's v1 and v2 endpoints, "
        "packed into one worker.")
    demo_variant: str = Field("general-heavy", description="Variant `make demo` runs (Swin-T: quick on CPU).")
    weights_fallback: str = Field("recipe", description="The local stack falls back to recipe weights, loudly.")
    allow_loopback_urls: bool = Field(
        True, description="Let image URLs (and webhooks) reach 127.0.0.1 on any port, as the demo's own servers "
        "need; false: the production SSRF rules (public addresses, ports 80/443) apply to the local stack too.")
    hub_probe_timeout: float = Field(
        3.0, description="Seconds to wait for Hugging Face (HF_ENDPOINT) before starting the workers offline "
        "(HF_HUB_OFFLINE=1: cached checkpoints, else the fallback) instead of retrying every download; 0: no probe.")


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path


def make_tls(directory: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> TlsFiles:
    """A private CA and a server certificate for `hosts` signed by it (clients trust ca.pem)."""
    now = datetime.datetime.now(datetime.UTC)
    not_before, not_after = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=30)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def alt(host: str) -> x509.GeneralName:
        try:
            return x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            return x509.DNSName(host)

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder(subject_name=name("birefnet local CA"), issuer_name=name("birefnet local CA"),
                                  public_key=ca_key.public_key(), serial_number=x509.random_serial_number(),
                                  not_valid_before=not_before, not_valid_after=not_after)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder(subject_name=name(hosts[0]), issuer_name=ca.subject, public_key=key.public_key(),
                                    serial_number=x509.random_serial_number(),
                                    not_valid_before=not_before, not_valid_after=not_after)
            .add_extension(x509.SubjectAlternativeName([alt(h) for h in hosts]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    files = TlsFiles(directory / "ca.pem", directory / "gateway.pem", directory / "gateway.key")
    files.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    files.key.chmod(0o600)
    return files


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
    fallback when there is no network. A TCP connect to the hub's host within `timeout` counts as reachable."""
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

    def __init__(self, dev: DevStackSettings | None = None, log_dir: Path | None = None,
                 environ: Mapping[str, str] | None = None):
        self.dev = dev or DevStackSettings()
        self.environ = dict(os.environ if environ is None else environ)
        self.log_dir = log_dir or Path(tempfile.mkdtemp(prefix="birefnet-stack-"))
        self.redis = RedisServer(port=self.dev.redis_port, data_dir=str(self.log_dir / "redis"))
        self.aws = MotoServer(port=self.dev.aws_port)
        self.processes: dict[str, subprocess.Popen] = {}
        self.env: dict[str, str] = {}
        self.settings: Settings | None = None
        self.tls: TlsFiles | None = None
        self.workers: dict[str, list[str]] = {}  # process name -> the variant ids it serves
        self.hub_offline_reason: str | None = None

    @property
    def gateway_url(self) -> str:
        return f"https://127.0.0.1:{self.dev.gateway_port}"

    def start(self, *, with_worker: bool = True, variants: str | None = None) -> LocalStack:
        """Everything, workers last. `variants` overrides `BIREFNET_DEV_WORKER_VARIANTS` (same syntax)."""
        (self.log_dir / "redis").mkdir(parents=True, exist_ok=True)
        self.redis.start()
        self.aws.start()
        # A development stack: signing keys generated into its own Redis are fine here (production refuses them).
        extra = {"BIREFNET_WEIGHTS_FALLBACK": self.dev.weights_fallback, "BIREFNET_ALLOW_DEV_SECRETS": "true"}
        if self.dev.allow_loopback_urls:
            # The demo's webhook receiver and local image servers live on loopback, which production refuses.
            extra |= {"BIREFNET_FETCH_ALLOW_NETWORKS": "127.0.0.1/32", "BIREFNET_FETCH_ALLOWED_PORTS": "*"}
        self.env = stack_environment(self.environ, self.redis.url, self.aws.url, extra)
        settings = settings_from(self.env, dotenv=True)
        self.env["BIREFNET_SQS_QUEUE_URL"] = provision_aws(settings, self.env).queue_url
        self.settings = settings.model_copy(update={"sqs_queue_url": self.env["BIREFNET_SQS_QUEUE_URL"]})
        self._spawn("producer", ["-m", "producer", "sqs"])
        self._spawn("webhooks", ["-m", "deliverer", "--concurrency", "2"])
        self.tls = make_tls(self.log_dir)
        self._spawn("gateway", ["-m", "gateway"], {
            "BIREFNET_GATEWAY_HOST": "127.0.0.1", "BIREFNET_GATEWAY_PORT": str(self.dev.gateway_port),
            "BIREFNET_GATEWAY_TLS_CERT": str(self.tls.cert), "BIREFNET_GATEWAY_TLS_KEY": str(self.tls.key),
            "BIREFNET_GATEWAY_AUTH": "off",  # development mode: any FAL_KEY works
        })
        if with_worker:
            self.hub_offline_reason = hub_offline_reason(self.dev.hub_probe_timeout, self.env)
            worker_env = {"HF_HUB_OFFLINE": "1"} if self.hub_offline_reason else {}
            for index, group in enumerate(worker_groups(variants or self.dev.worker_variants, self.settings)):
                name = "worker" if index == 0 else f"worker{index + 1}"
                self.workers[name] = group
                self._spawn(name, ["-m", "worker", "--variants", ",".join(group)], {
                    **worker_env, "BIREFNET_READY_FILE": str(self.ready_file(name)),
                    "BIREFNET_WORKER_METRICS_PORT": str(free_port()),
                })
        return self

    def ready_file(self, worker: str) -> Path:
        return self.log_dir / f"{worker}.ready"

    def _spawn(self, name: str, args: list[str], extra_env: dict[str, str] | None = None) -> None:
        self.processes[name] = spawn_python(args, {**self.env, **(extra_env or {})}, self.log_dir / f"{name}.log")

    def wait_worker_ready(self, timeout: float = 300) -> None:
        """Until every worker has written its ready file (raises if one exits first)."""
        deadline = time.time() + timeout
        while not all(self.ready_file(name).exists() for name in self.workers):
            for name in self.workers:
                if self.processes[name].poll() is not None:
                    raise RuntimeError(f"{name} exited; see {self.log_dir / (name + '.log')}:\n{self.tail(name)}")
            if time.time() > deadline:
                raise TimeoutError("the workers did not become ready")
            time.sleep(0.2)

    def tail(self, name: str, lines: int = 30) -> str:
        path = self.log_dir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def stop(self) -> None:
        stop_processes(self.processes.values())
        self.aws.stop()
        self.redis.stop()
