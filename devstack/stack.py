"""A private local stack on loopback: Redis, S3+SQS (moto), producer, webhook deliverer, worker(s), and the
fal-compatible gateway over HTTPS (certificate from a CA made for the stack, auth off).

Used by `make up` (foreground) and `make demo`. Ports and names come from settings
(BIREFNET_DEV_* for the stack's own ports, BIREFNET_* for the rest).
"""

from __future__ import annotations

import datetime
import ipaddress
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from common.settings import Settings
from devstack.services import MotoServer, RedisServer, provision_aws, stack_environment

ROOT = Path(__file__).resolve().parent.parent


class DevStackSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BIREFNET_DEV_", extra="ignore")

    redis_port: int = Field(6390, description="Port of the local stack's redis-server.")
    aws_port: int = Field(5390, description="Port of the local stack's S3+SQS endpoint (moto).")
    gateway_port: int = Field(8390, description="Port of the local stack's fal-compatible gateway (HTTPS, auth off).")
    worker_variants: str = Field("general-heavy", description="Variants the local stack's worker serves.")
    weights_fallback: str = Field("recipe", description="The local stack falls back to recipe weights, loudly.")


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path


def make_tls(directory: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> TlsFiles:
    """A private CA and a server certificate for `hosts` signed by it (clients trust ca.pem)."""
    now = datetime.datetime.now(datetime.UTC)
    valid = {"not_valid_before": now - datetime.timedelta(minutes=5), "not_valid_after": now + datetime.timedelta(days=30)}

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def alt(host: str) -> x509.GeneralName:
        try:
            return x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            return x509.DNSName(host)

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder(subject_name=name("birefnet local CA"), issuer_name=name("birefnet local CA"),
                                  public_key=ca_key.public_key(), serial_number=x509.random_serial_number(), **valid)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder(subject_name=name(hosts[0]), issuer_name=ca.subject, public_key=key.public_key(),
                                    serial_number=x509.random_serial_number(), **valid)
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


class LocalStack:
    def __init__(self, dev: DevStackSettings | None = None, log_dir: Path | None = None):
        self.dev = dev or DevStackSettings()
        self.log_dir = log_dir or Path(tempfile.mkdtemp(prefix="birefnet-stack-"))
        self.redis = RedisServer(port=self.dev.redis_port, data_dir=str(self.log_dir / "redis"))
        self.aws = MotoServer(port=self.dev.aws_port)
        self.processes: dict[str, subprocess.Popen] = {}
        self.env: dict[str, str] = {}
        self.settings: Settings | None = None
        self.tls: TlsFiles | None = None

    @property
    def gateway_url(self) -> str:
        return f"https://127.0.0.1:{self.dev.gateway_port}"

    def start(self, *, with_worker: bool = True) -> LocalStack:
        (self.log_dir / "redis").mkdir(parents=True, exist_ok=True)
        self.redis.start()
        self.aws.start()
        base = stack_environment(self.redis.url, self.aws.url, "", {
            "BIREFNET_WEIGHTS_FALLBACK": self.dev.weights_fallback,
            # The demo's webhook receiver and local image servers live on loopback, which production refuses.
            "BIREFNET_FETCH_ALLOW_NETWORKS": "127.0.0.1/32",
            "BIREFNET_FETCH_ALLOWED_PORTS": "*",
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
        self.tls = make_tls(self.log_dir)
        self._spawn("gateway", ["-m", "producer.gateway"], {
            "BIREFNET_GATEWAY_HOST": "127.0.0.1", "BIREFNET_GATEWAY_PORT": str(self.dev.gateway_port),
            "BIREFNET_GATEWAY_TLS_CERT": str(self.tls.cert), "BIREFNET_GATEWAY_TLS_KEY": str(self.tls.key),
            "BIREFNET_GATEWAY_AUTH": "off",  # development mode: any FAL_KEY works
        })
        if with_worker:
            self._spawn("worker", ["-m", "worker", "--variants", self.dev.worker_variants])
        return self

    def _spawn(self, name: str, args: list[str], extra_env: dict[str, str] | None = None) -> None:
        handle = open(self.log_dir / f"{name}.log", "w")  # noqa: SIM115 - lives as long as the process
        self.processes[name] = subprocess.Popen([sys.executable, *args], cwd=ROOT, env={**self.env, **(extra_env or {})},
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
