"""Managed Redis with real servers: every Redis user (gateway, Celery broker and workers, SQS producer,
webhook deliverer, ops) against (1) a TLS-only redis-server that wants a client certificate and an ACL user,
and (2) a Sentinel group whose master is killed while jobs flow: nothing accepted is lost, nothing completes
twice, each job gets one webhook.

The services are subprocesses (`python -m gateway`, `python -m producer sqs|webhooks`,
`python -m worker`) configured only through BIREFNET_REDIS_* settings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from common.adapters.redis_conn import redis_client
from common.settings import Settings
from devstack.load import Submitted, job_records, wait_for_completions
from devstack.loopback import loopback_values
from devstack.receiver import WebhookReceiver
from devstack.services import free_port, redis_server_binary
from tests.helpers.audit import DONE_LINE, log_lines
from tests.helpers.faults import GatewaySubmitter, upload
from tests.helpers.gateway import api_keys_setting
from tests.helpers.images import data_uri, small_png
from tests.helpers.redis_topologies import SentinelGroup, TlsRedis, tls_redis_binary
from tests.helpers.stack import ROOT, build_stack, wait_for

TLS_BINARY = tls_redis_binary()
FAILOVER_JOBS = int(os.environ.get("FAILOVER_JOBS", "24"))  # `make chaos`: 200
needs_tls = pytest.mark.skipif(
    TLS_BINARY is None, reason="no redis-server built with TLS (`make test` installs Debian's redis-server)"
)


class ManagedStack:
    """The services on loopback, pointed at Redis by `redis_env` alone."""

    def __init__(self, log_dir: Path, moto_url: str, redis_env: dict[str, str]):
        suffix = uuid.uuid4().hex[:8]
        self.gateway_port = free_port()
        values = loopback_values(
            **{
                "BIREFNET_INPUT_BUCKET": f"in-{suffix}",
                "BIREFNET_OUTPUT_BUCKET": f"out-{suffix}",
                "BIREFNET_GATEWAY_HOST": "127.0.0.1",
                "BIREFNET_GATEWAY_PORT": str(self.gateway_port),
                "BIREFNET_GATEWAY_API_KEYS": api_keys_setting(f"in-{suffix}"),
                "BIREFNET_TEST_LOG_DIR": str(log_dir),
                **redis_env,
            }
        )
        self.stack = build_stack(
            redis_env["BIREFNET_REDIS_URL"], moto_url, values, queue_name=f"events-{suffix}"
        )
        self.settings, self.env = self.stack.settings, self.stack.env
        self.moto_url = moto_url

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    def start(self, workers: int = 1) -> ManagedStack:
        self.stack.start_gateway()
        self.stack.start_producer()
        self.stack.start_deliverer(concurrency=4)
        for n in range(workers):
            self.stack.start_worker("general-light", name=f"worker-{n + 1}", wait=False)
        for n in range(workers):
            ready = Path(self.env["BIREFNET_TEST_LOG_DIR"]) / f"worker-{n + 1}.ready"
            wait_for(ready.exists, 180, f"worker-{n + 1} ready")

        def up() -> bool:
            try:
                return httpx.get(f"{self.gateway_url}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, 60, "the gateway")
        return self

    def s3(self):
        import boto3

        from common.adapters.storage import boto_config

        return boto3.client(
            "s3", region_name=self.settings.aws_region, endpoint_url=self.moto_url, config=boto_config()
        )

    def outcome(self, submitted: Submitted, receiver: WebhookReceiver, timeout: float) -> dict:
        """Wait until every accepted job is COMPLETED with a webhook; then what became of each."""
        client = redis_client(self.settings, socket_timeout=5)
        from common.state.jobs import JobStore

        store = JobStore(client)
        ids = wait_for_completions(store, self.settings.input_bucket, submitted, receiver, timeout)
        records = job_records(store)
        time.sleep(2)  # a second webhook or run, if there were to be one, has time to show
        webhooks = Counter(item.json()["request_id"] for item in list(receiver.received))
        runs = {rid: sum(bool(DONE_LINE.match(line)) for line in log_lines(store, rid)) for rid in ids}
        client.close()
        return {
            "ids": ids,
            "failed": {rid: records[rid].error for rid in ids if not records[rid].ok},
            "webhooks": {rid: webhooks[rid] for rid in ids},
            "runs": runs,
            "uploads_with_jobs": len(submitted.s3_keys),
        }

    def close(self) -> None:
        self.stack.stop_all()


def submit_some(
    stack: ManagedStack,
    receiver: WebhookReceiver,
    out: Submitted,
    count: int,
    rate: float,
    stop: threading.Event | None = None,
) -> None:
    """Half through the gateway, half as uploads with a webhook in their metadata."""
    submitter = GatewaySubmitter(stack.gateway_url, receiver.url)
    s3 = stack.s3()
    try:
        for n in range(count):
            if stop is not None and stop.is_set():
                return
            if n % 2 == 0:
                out.api.append(submitter.submit({"image_url": data_uri(small_png(n))}))
            else:
                key = f"managed/{n:04d}.png"
                upload(s3, stack.settings.input_bucket, key, small_png(n), {"webhook_url": receiver.url})
                out.s3_keys.append(key)
            time.sleep(1 / rate)
    finally:
        out.refused += submitter.refused
        submitter.close()


def assert_every_job_once(result: dict, submitted: Submitted) -> None:
    assert len(result["ids"]) == len(submitted.api) + len(submitted.s3_keys)
    assert result["failed"] == {}
    assert set(result["webhooks"].values()) == {1}, "one webhook per job"
    # "done in" is a job's last log line, written after its completion: at most one per job. A failover
    # right after a completion can swallow that line (the job itself is COMPLETED, replicated, with its
    # webhook), so zero is possible; two would be a job completed twice.
    assert max(result["runs"].values()) <= 1, "no job ran to completion twice"


@needs_tls
@pytest.mark.timeout(400)
def test_tls_acl_and_client_certificate_for_every_redis_user(moto_endpoint: str, tmp_path: Path):
    server = TlsRedis(TLS_BINARY, tmp_path).start()
    c = server.certs
    # The server really insists: no client certificate, or a wrong password, is refused.
    once = {"retry": Retry(NoBackoff(), 0), "socket_timeout": 3}
    with pytest.raises(redis.ConnectionError):
        redis.Redis(
            host="127.0.0.1",
            port=server.port,
            ssl=True,
            ssl_ca_certs=str(c.ca),
            username=server.username,
            password=server.password,
            **once,
        ).ping()
    with pytest.raises(redis.AuthenticationError):
        server.client(password="wrong", **once).ping()
    with pytest.raises((redis.ConnectionError, redis.TimeoutError)):
        redis.Redis(port=server.port, **once).ping()  # plain TCP on the TLS port
    redis_env = {
        "BIREFNET_REDIS_URL": f"rediss://127.0.0.1:{server.port}/0",
        "BIREFNET_REDIS_USERNAME": server.username,
        "BIREFNET_REDIS_PASSWORD": server.password,
        "BIREFNET_REDIS_TLS_CA_FILE": str(c.ca),
        "BIREFNET_REDIS_TLS_CERT_FILE": str(c.client_cert),
        "BIREFNET_REDIS_TLS_KEY_FILE": str(c.client_key),
    }
    stack = ManagedStack(tmp_path, moto_endpoint, redis_env)
    receiver = WebhookReceiver().start()
    try:
        stack.start(workers=1)
        submitted = Submitted()
        submit_some(stack, receiver, submitted, count=6, rate=4)
        result = stack.outcome(submitted, receiver, timeout=180)
        assert_every_job_once(result, submitted)
        # ops reads the same Redis with the same settings.
        ops = subprocess.run(
            [sys.executable, "-m", "ops", "status", "--json"],
            cwd=ROOT,
            env=stack.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert ops.returncode == 0, ops.stderr
        assert json.loads(ops.stdout)["variants"]
        clients = server.client().client_list()
        assert {entry["user"] for entry in clients} == {server.username}, "everyone logs in as the ACL user"
    finally:
        stack.close()
        receiver.stop()
        server.stop()


@pytest.mark.timeout(500)
def test_sentinel_failover_during_a_run_loses_nothing_and_repeats_nothing(moto_endpoint: str, tmp_path: Path):
    # One replica, and WAIT for it: every acknowledged write is on the only node a failover can promote.
    # (With two replicas and WAIT 1, the sentinels once failed over twice, to the replica that had not
    # acknowledged, and 4 of 24 accepted jobs were gone: WAIT must count every replica.)
    group = SentinelGroup(TLS_BINARY or redis_server_binary(), tmp_path, replicas=1).start()
    redis_env = {
        "BIREFNET_REDIS_URL": "redis://sentinel-managed/0",  # only the scheme and database are used
        "BIREFNET_REDIS_PASSWORD": group.password,
        "BIREFNET_REDIS_SENTINELS": ",".join(f"127.0.0.1:{port}" for port in group.sentinel_ports),
        "BIREFNET_REDIS_SENTINEL_MASTER": group.master_name,
        "BIREFNET_REDIS_WAIT_REPLICAS": "1",
        "BIREFNET_REDIS_WAIT_TIMEOUT_MS": "500",
    }
    stack = ManagedStack(tmp_path, moto_endpoint, redis_env)
    receiver = WebhookReceiver().start()
    try:
        stack.start(workers=2)
        submitted = Submitted()
        thread = threading.Thread(
            target=submit_some, args=(stack, receiver, submitted, FAILOVER_JOBS, 4), daemon=True
        )
        thread.start()
        wait_for(
            lambda: len(submitted.api) + len(submitted.s3_keys) >= FAILOVER_JOBS // 3, 120, "jobs flowing"
        )
        old = group.kill_master()
        wait_for(lambda: group.master_port() not in (None, old), 60, "the sentinels to promote a replica")
        thread.join(timeout=300)
        assert not thread.is_alive()
        result = stack.outcome(submitted, receiver, timeout=300)
        print(
            "sentinel failover:",
            json.dumps(
                {
                    "jobs": len(result["ids"]),
                    "refused_and_retried": submitted.refused,
                    "old_master": old,
                    "new_master": group.master_port(),
                    "last_log_line_lost": sum(n == 0 for n in result["runs"].values()),
                }
            ),
        )
        assert_every_job_once(result, submitted)
        crashed = [proc.args for proc in stack.stack.processes if proc.poll() is not None]
        assert not crashed, f"services exited during the failover: {crashed}"
    finally:
        stack.close()
        receiver.stop()
        group.stop()


def test_settings_build_one_consistent_client_and_broker():
    """The pieces every Redis user gets from common.adapters.redis_conn, for each shape of configuration."""
    from common.adapters.redis_conn import RedisTarget, celery_broker

    plain = Settings(redis_url="redis://u:p%40ss@cache.internal:6380/4")
    assert celery_broker(plain).url == "redis://u:p%40ss@cache.internal:6380/4"
    tls = Settings(
        redis_url="rediss://cache.internal:6390/2",
        redis_username="svc",
        redis_password="a:b/c",
        redis_tls_ca_file="/ca.pem",
    )
    broker = celery_broker(tls)
    assert broker.url == "rediss://svc:a%3Ab%2Fc@cache.internal:6390/2"
    assert broker.use_ssl["ssl_ca_certs"] == "/ca.pem"
    target = RedisTarget.from_settings(tls)
    assert target.tls_kwargs()["ssl"] is True and target.password == "a:b/c"
    sentinel = Settings(
        redis_url="rediss://x/5",
        redis_sentinels="10.0.0.1:26379, 10.0.0.2:26379",
        redis_sentinel_master="jobs",
        redis_password="pw",
        redis_sentinel_password="spw",
    )
    broker = celery_broker(sentinel)
    assert broker.url == "sentinel://:pw@10.0.0.1:26379/5;sentinel://:pw@10.0.0.2:26379/5"
    assert broker.transport_options["master_name"] == "jobs"
    assert broker.transport_options["sentinel_kwargs"]["password"] == "spw"
    assert broker.transport_options["sentinel_kwargs"]["ssl"] is True and broker.use_ssl is not None
    with pytest.raises(ValueError):
        RedisTarget.from_settings(Settings(redis_url="memcached://x"))


def test_sentinel_broker_channel_closes_after_a_lost_connection_and_restores_its_message(tmp_path: Path):
    """What kombu does when a failover drops the broker connection: the connection's details go, then the
    channel closes and puts its unacknowledged messages back. kombu's own Sentinel channel raises there (and
    Celery stops the process as 'unrecoverable'); ours closes and the message is back in its queue."""
    import kombu
    import kombu.transport.redis as kombu_redis

    from common.adapters.redis_conn import SentinelTransport, celery_broker

    group = SentinelGroup(TLS_BINARY or redis_server_binary(), tmp_path, replicas=1).start()
    try:
        settings = Settings(
            redis_url="redis://x/2",
            redis_password=group.password,
            redis_sentinels=",".join(f"127.0.0.1:{p}" for p in group.sentinel_ports),
            redis_sentinel_master=group.master_name,
        )
        broker = celery_broker(settings)
        master = redis.Redis(port=group.master_port(), password=group.password, db=2)
        outcomes = {}
        for transport in (None, broker.transport):
            conn = kombu.Connection(
                broker.url, transport=transport, transport_options=broker.transport_options
            )
            queue = kombu.Queue("lost-connection", routing_key="lost-connection")
            with conn.Producer() as producer:
                producer.publish({"n": 1}, routing_key="lost-connection", declare=[queue])
            channel = conn.channel()
            taken = []
            kombu.Consumer(
                channel, [queue], callbacks=[lambda body, message, taken=taken: taken.append(message)]
            ).consume()
            conn.drain_events(timeout=10)
            assert taken and master.llen("lost-connection") == 0, "the message is held, unacknowledged"
            conn.transport.client = None
            try:
                channel.close()
                outcomes[type(conn.transport)] = master.llen("lost-connection")
            except AttributeError:
                outcomes[type(conn.transport)] = "AttributeError"
            master.delete("lost-connection")
        assert outcomes == {kombu_redis.SentinelTransport: "AttributeError", SentinelTransport: 1}, (
            "kombu fixed it? then drop common.adapters.redis_conn.SentinelChannel"
        )
    finally:
        group.stop()
