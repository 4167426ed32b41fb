"""Real-process machinery for the chaos, poison and load tests and bench/bench_load.py (no tests here).

- `TcpProxy`: a loopback TCP forwarder that can be cut (new connections refused, open ones reset) and
  restored on the same port. It stands between the services and moto's S3, so S3 can go away for a while
  without losing moto's in-memory data.
- `ChaosStack`: its own redis-server (AOF, `appendfsync always`) that can be crashed and restarted on the
  same port and data directory, S3 behind a `TcpProxy`, and the services as subprocesses: the gateway
  (`python -m gateway`), the SQS producer, the webhook deliverer and workers that can be killed.
- Submitters through the gateway (HTTP, with an API key) and through S3 uploads (events via SQS).
- `audit()`: what became of every accepted job (results, webhooks, runs, stuck records).

Every wait is bounded in time; nothing binds anything but 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis

from common.adapters import broker
from common.adapters.storage import RESULT_DOCUMENT
from common.settings import Settings
from common.state import keys, ops_state
from common.state.jobs import JobRecord, JobStore
from devstack.receiver import WebhookReceiver
from devstack.services import RedisServer, aws_client, free_port
from tests.helpers.gateway import ALICE, api_keys_setting, auth, signing_seed
from tests.helpers.images import data_uri, flat_png, small_png  # noqa: F401 - chaos tests take them from here
from tests.helpers.stack import TEST_VARIANTS, Stack, build_stack, settings_from, wait_for  # noqa: F401

V2 = "/queue/fal-ai/birefnet/v2"
VARIANT = "general-light"
DONE_LINE = re.compile(r"^done in ")  # the runner's last job log line, written once per finished run


# --- a cuttable TCP proxy ----------------------------------------------------------------------------
class TcpProxy:
    """Forwards 127.0.0.1:`port` to `target`. `cut()` closes the listener and resets open connections, so
    clients see 'connection refused' until `restore()` listens on the same port again."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1", port: int | None = None):
        self.target = (target_host, target_port)
        self.port = port or free_port()
        self._listener: socket.socket | None = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name="tcp-proxy", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> TcpProxy:
        self.restore()
        self._thread.start()
        return self

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        listener.settimeout(0.1)
        with self._lock:
            self._listener = listener

    def cut(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._open = self._open, set()
        if listener is not None:
            listener.close()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                conn.close()  # linger 0: the peer gets a reset, as when a host goes away

    def stop(self) -> None:
        self._stopped.set()
        self.cut()
        self._thread.join(timeout=5)

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            with self._lock:
                listener = self._listener
            if listener is None:
                time.sleep(0.05)
                continue
            try:
                client, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            self._connect(client)

    def _connect(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            client.close()
            return
        with self._lock:
            if self._listener is None:  # cut while connecting
                client.close()
                upstream.close()
                return
            self._open |= {client, upstream}
        for src, dst in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        src.settimeout(None)
        try:
            while chunk := src.recv(65536):
                dst.sendall(chunk)
        except OSError:
            pass
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        with self._lock:
            self._open -= {src, dst}
        src.close()


# --- the stack ---------------------------------------------------------------------------------------
def chaos_environment(**overrides: str) -> dict[str, str]:
    """Settings of a chaos or load stack: nano model at 128x128, short timeouts so failures heal fast."""
    values = {
        "BIREFNET_VARIANT_OVERRIDES": json.dumps(TEST_VARIANTS),
        "BIREFNET_WEIGHTS_FALLBACK": "none",
        "BIREFNET_TEST_OPERATING_RESOLUTION": "128x128",
        "BIREFNET_MASK_CACHE_SECONDS": "0",  # every job runs the network: the load is what it says
        "BIREFNET_TORCH_THREADS": "1",
        "BIREFNET_VISIBILITY_TIMEOUT": "3",
        "BIREFNET_UNACKED_RESTORE_INTERVAL": "1",
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
        # Several processes of a kind on one host (and other test runs): no fixed metrics ports.
        "BIREFNET_WORKER_METRICS_PORT": "0",
        "BIREFNET_PRODUCER_METRICS_PORT": "0",
        "BIREFNET_WEBHOOKS_METRICS_PORT": "0",
    }
    values.update(overrides)
    return values


@dataclass
class ChaosStack:
    """Everything on loopback; `start()` brings up Redis, S3 proxy, buckets/queue and the chosen services."""

    log_dir: Path
    moto_url: str
    overrides: dict[str, str] = field(default_factory=dict)
    s3_proxy: bool = True  # False: services talk to moto directly (load runs, where nothing is cut)
    redis: RedisServer = field(init=False)
    proxy: TcpProxy = field(init=False)
    stack: Stack = field(init=False)
    settings: Settings = field(init=False)
    gateway_port: int = field(default_factory=free_port)
    workers: dict[str, subprocess.Popen] = field(default_factory=dict)  # log name -> process
    worker_starts: int = 0
    redis_restarts: int = 0

    def start(self, *, workers: int = 2, gateway: bool = True, producer: bool = True,
              webhooks: bool = True) -> ChaosStack:
        (self.log_dir / "redis").mkdir(exist_ok=True)
        self.redis = RedisServer(data_dir=str(self.log_dir / "redis")).start()
        self.proxy = TcpProxy(int(self.moto_url.rsplit(":", 1)[1])).start()
        suffix = uuid.uuid4().hex[:8]
        values = chaos_environment(**{
            "BIREFNET_INPUT_BUCKET": f"in-{suffix}", "BIREFNET_OUTPUT_BUCKET": f"out-{suffix}",
            "BIREFNET_GATEWAY_HOST": "127.0.0.1", "BIREFNET_GATEWAY_PORT": str(self.gateway_port),
            "BIREFNET_GATEWAY_API_KEYS": api_keys_setting(f"in-{suffix}"),
            "BIREFNET_TEST_LOG_DIR": str(self.log_dir), **self.overrides})
        # Only S3 goes through the cuttable proxy.
        self.stack = build_stack(self.redis.url, self.proxy.url if self.s3_proxy else self.moto_url, values,
                                 queue_name=f"events-{suffix}", sqs_url=self.moto_url)
        self.settings = self.stack.settings
        self._versioned_output_and_quick_queue(self.settings.sqs_queue_url)
        if gateway:
            self.stack.start(["-m", "gateway"], "gateway")
        if producer:
            self.stack.start(["-m", "producer", "sqs"], "producer")
        if webhooks:
            self.stack.start(["-m", "deliverer", "--concurrency", "4"], "webhooks")
        names = [self.start_worker(wait=False) for _ in range(workers)]
        for name in names:
            self.wait_ready(name)
        if gateway:
            wait_for(self.gateway_up, 60, "the gateway to answer")
        return self

    def _versioned_output_and_quick_queue(self, queue_url: str) -> None:
        """Output bucket versioning counts every write of a result document (a job done twice would
        leave two versions); a short SQS visibility timeout brings back events that failed quickly."""
        self.s3_direct().put_bucket_versioning(Bucket=self.settings.output_bucket,
                                               VersioningConfiguration={"Status": "Enabled"})
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
        return JobStore(redis.Redis.from_url(self.settings.redis_url, decode_responses=True,
                                             socket_timeout=10, retry_on_timeout=True))

    def s3_direct(self):
        """S3 as a user sees it (straight to moto, never cut)."""
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
        proc, ready = self.workers[name], self.log_dir / f"{name}.ready"
        wait_for(lambda: ready.exists() or proc.poll() is not None, timeout, f"{name} ready")
        assert proc.poll() is None, self.stack.tail(name)

    def live_workers(self) -> list[subprocess.Popen]:
        return [p for p in self.workers.values() if p.poll() is None]

    def busy_worker(self, avoid: Collection[str] = (), timeout: float = 60) -> tuple[int, str]:
        """(pid, request id) of a worker of ours running a job not in `avoid`, waiting for one if needed."""
        store = self.store()

        def busy() -> tuple[int, str] | None:
            pids = {p.pid for p in self.live_workers()}
            for rid in ops_state.running_jobs(store.redis, [VARIANT])[VARIANT]:
                name = store.redis.hget(keys.job(rid), "worker") or ""
                pid = int(name.rsplit(":", 1)[1]) if ":" in name else 0
                if rid not in avoid and pid in pids:
                    return pid, rid
            return None

        try:
            return wait_for(busy, timeout, "a worker busy with a job", interval=0.02)
        finally:
            store.redis.close()

    def kill_busy_worker(self, avoid: set[str], timeout: float = 60) -> str:
        """SIGKILL a worker of ours while it runs a job not in `avoid`; returns that job's id."""
        pid, rid = self.busy_worker(avoid, timeout)
        os.kill(pid, signal.SIGKILL)
        next(p for p in self.workers.values() if p.pid == pid).wait(timeout=10)
        return rid

    # --- Redis and S3 trouble ---
    def crash_redis(self, down_seconds: float) -> None:
        """kill -9 redis-server, then start it again on the same port and data dir (the AOF is replayed)."""
        self.redis.stop(kill=True)
        time.sleep(down_seconds)
        self.redis.start()
        self.redis_restarts += 1

    def s3_outage(self, seconds: float) -> None:
        self.proxy.cut()
        try:
            time.sleep(seconds)
        finally:
            self.proxy.restore()

    def close(self) -> None:
        """Stop whatever `start()` got to start."""
        if hasattr(self, "stack"):
            self.stack.stop_all()
        if hasattr(self, "proxy"):
            self.proxy.stop()
        if hasattr(self, "redis"):
            self.redis.stop()


def resident_mb(pid: int) -> float:
    """Resident memory of a process, from /proc (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class OomKiller:
    """Plays the kernel's OOM killer for a stack's workers under a memory limit: SIGKILL as soon as one's
    resident memory passes `limit_mb`; then, like a container restart policy, starts a new worker."""

    def __init__(self, stack: ChaosStack, limit_mb: float, max_kills: int = 10):
        self.stack, self.limit_mb, self.max_kills = stack, limit_mb, max_kills
        self.kills: list[float] = []  # resident MB of each killed worker
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="oom-killer", daemon=True)

    def __enter__(self) -> OomKiller:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _watch(self) -> None:
        while not self._stop.wait(0.02) and len(self.kills) < self.max_kills:
            for proc in self.stack.live_workers():
                used = resident_mb(proc.pid)
                if used > self.limit_mb:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)
                    self.kills.append(round(used))
                    self.stack.start_worker(wait=False)


# --- submitting ------------------------------------------------------------------------------------
class GatewaySubmitter:
    """fal-style submits with a webhook; a 503 or a refused connection means 'not accepted, try again'."""

    def __init__(self, base_url: str, webhook_url: str | None, credential: str = ALICE):
        self.client = httpx.Client(base_url=base_url, headers=auth(credential), timeout=30)
        self.webhook_url = webhook_url
        self.refused = 0  # answers that were not an acceptance (retried)

    def submit(self, body: dict, attempts: int = 120) -> str:
        params = {"fal_webhook": self.webhook_url} if self.webhook_url else None
        for _ in range(attempts):
            try:
                response = self.client.post(V2, json=body, params=params)
            except httpx.TransportError:
                response = None
            if response is not None and response.status_code == 200:
                return response.json()["request_id"]
            assert response is None or response.status_code >= 500, response.text
            self.refused += 1
            time.sleep(0.25)
        raise AssertionError(f"the gateway did not accept a request in {attempts} tries")

    def close(self) -> None:
        self.client.close()


def upload(s3, bucket: str, key: str, body: bytes, metadata: dict[str, str], attempts: int = 20) -> None:
    for attempt in range(attempts):
        try:
            s3.put_object(Bucket=bucket, Key=key, Body=body, Metadata=metadata)
            return
        except Exception:  # moto itself is never cut; this only guards against a hiccup
            if attempt == attempts - 1:
                raise
            time.sleep(0.2)


@dataclass
class Submitted:
    api: list[str] = field(default_factory=list)  # accepted request ids
    s3_keys: list[str] = field(default_factory=list)  # uploaded keys (each must become one job)
    times: dict[str, float] = field(default_factory=dict)  # request id or key -> when it was accepted
    refused: int = 0  # gateway answers that were not an acceptance (503 while Redis was down), retried


def submit_mixed(stack: ChaosStack, count: int, rate: float, webhook_url: str | None, out: Submitted,
                 stop: threading.Event, api_share: float = 0.5, prefix: str = "chaos") -> None:
    """Submit `count` jobs at about `rate` per second, alternating gateway requests and S3 uploads."""
    submitter = GatewaySubmitter(stack.gateway_url, webhook_url)
    s3 = stack.s3_direct()
    metadata = {"webhook_url": webhook_url} if webhook_url else {}
    api_every = round(1 / api_share) if api_share else 0
    started = time.time()
    try:
        for n in range(count):
            if stop.is_set():
                return
            if api_every and n % api_every == 0:
                rid = submitter.submit({"image_url": data_uri(small_png(n))})
                out.api.append(rid)
                out.times[rid] = time.time()
            else:
                key = f"{prefix}/{n:05d}.png"
                upload(s3, stack.settings.input_bucket, key, small_png(n), metadata)
                out.s3_keys.append(key)
                out.times[key] = time.time()
            time.sleep(max(0.0, started + (n + 1) / rate - time.time()))
    finally:
        out.refused += submitter.refused
        submitter.close()


# --- what became of the jobs ---------------------------------------------------------------------------
def job_records(store: JobStore) -> dict[str, JobRecord]:
    records = {}
    for key in store.redis.scan_iter("birefnet:job:*", count=1000):
        if key.count(":") == 2:
            record = store.get(key.rsplit(":", 1)[1])
            if record is not None:
                records[record.request_id] = record
    return records


def jobs_by_key(records: dict[str, JobRecord], bucket: str) -> dict[str, list[str]]:
    """Uploaded key -> ids of the jobs made from it (the promise: exactly one)."""
    out: dict[str, list[str]] = {}
    for record in records.values():
        if record.spec.source == "s3_event" and record.spec.image_url.startswith(f"s3://{bucket}/"):
            out.setdefault(record.spec.image_url.split("/", 3)[3], []).append(record.request_id)
    return out


def expected_ids(submitted: Submitted, records: dict[str, JobRecord], bucket: str) -> list[str] | None:
    """Ids of every accepted job, or None while some upload has no job yet."""
    by_key = jobs_by_key(records, bucket)
    if any(key not in by_key for key in submitted.s3_keys):
        return None
    return [*submitted.api, *(rid for key in submitted.s3_keys for rid in by_key[key])]


def wait_all_done(stack: ChaosStack, submitted: Submitted, receiver: WebhookReceiver | None,
                  timeout: float) -> list[str]:
    """Wait until every accepted job is COMPLETED (and, with a receiver, has its webhook)."""
    store = stack.store()
    try:
        return wait_for_completions(store, stack.settings.input_bucket, submitted, receiver, timeout)
    finally:
        store.redis.close()


def wait_for_completions(store: JobStore, bucket: str, submitted: Submitted, receiver: WebhookReceiver | None,
                         timeout: float) -> list[str]:
    """The ids of every accepted job once all are COMPLETED (and, with a receiver, have their webhook)."""
    def done() -> list[str] | None:
        try:
            records = job_records(store)
        except redis.RedisError:
            return None
        ids = expected_ids(submitted, records, bucket)
        if ids is None or any(records[rid].status != "COMPLETED" for rid in ids):
            return None
        if receiver is not None and not set(ids) <= delivered_ids(receiver):
            return None
        return ids

    return wait_for(done, timeout, "every accepted job to complete with its webhook", interval=0.5)


def delivered_ids(receiver: WebhookReceiver) -> set[str]:
    return {item.json()["request_id"] for item in list(receiver.received)}


def log_lines(store: JobStore, request_id: str) -> list[str]:
    return [entry["message"] for entry in store.logs(request_id)]


def result_versions(stack: ChaosStack) -> Counter:
    """Stored versions of every result document, by key (the output bucket is versioned: a document written
    twice has two). One listing of the whole bucket."""
    versions: Counter = Counter()
    paginator = stack.s3_direct().get_paginator("list_object_versions")
    for page in paginator.paginate(Bucket=stack.settings.output_bucket, Prefix=stack.settings.output_prefix):
        versions.update(v["Key"] for v in page.get("Versions", []) if v["Key"].endswith("/" + RESULT_DOCUMENT))
    return versions


@dataclass
class Audit:
    jobs: int
    ok: int
    failed: dict[str, str]  # request id -> error type
    runs_started: int  # claims that got as far as loading the image
    runs_finished: Counter  # request id -> "done in" log lines
    result_docs: Counter  # request id -> result.json objects under its prefix (must be 1)
    result_writes: Counter  # request id -> versions of that document
    webhooks: Counter  # request id -> deliveries received
    jobs_per_key: dict[str, int]
    stuck: list[str]  # any record still IN_QUEUE / IN_PROGRESS
    unexpected_webhooks: list[str]

    @property
    def duplicates(self) -> dict[str, str]:
        """Jobs done more than once, in any of the ways that could show it."""
        out = {}
        for rid, n in self.runs_finished.items():
            if n > 1:
                out[rid] = f"{n} finished runs"
        for rid, n in self.webhooks.items():
            if n != 1:
                out[rid] = f"{n} webhooks"
        for rid, n in self.result_docs.items():
            if n != 1:
                out[rid] = f"{n} result documents"
        for key, n in self.jobs_per_key.items():
            if n != 1:
                out[key] = f"{n} jobs for one upload"
        return out

    def summary(self) -> dict:
        return {"jobs": self.jobs, "ok": self.ok, "failed": len(self.failed), "runs_started": self.runs_started,
                "reruns": self.runs_started - self.jobs, "result_doc_rewrites":
                sum(self.result_writes.values()) - self.jobs, "duplicates": len(self.duplicates),
                "stuck": len(self.stuck), "unexpected_webhooks": len(self.unexpected_webhooks)}


def audit(stack: ChaosStack, submitted: Submitted, receiver: WebhookReceiver | None) -> Audit:
    store = stack.store()
    records = job_records(store)
    ids = expected_ids(submitted, records, stack.settings.input_bucket) or []
    webhooks = Counter(item.json()["request_id"] for item in list(receiver.received)) if receiver else Counter()
    result_docs: Counter = Counter()
    result_writes: Counter = Counter()
    runs_finished: Counter = Counter()
    runs_started = 0
    versions = result_versions(stack)
    for rid in ids:
        written = versions.get(records[rid].spec.output_prefix + RESULT_DOCUMENT, 0)
        result_writes[rid] = written
        result_docs[rid] = 1 if written else 0  # one key per job; its versions are rewrites
        lines = log_lines(store, rid)
        runs_finished[rid] = sum(bool(DONE_LINE.match(line)) for line in lines)
        runs_started += sum(line == "loading image" for line in lines)
    by_key = jobs_by_key(records, stack.settings.input_bucket)
    result = Audit(
        jobs=len(ids), ok=sum(records[rid].ok for rid in ids),
        failed={rid: records[rid].error_type or "" for rid in ids if not records[rid].ok},
        runs_started=runs_started, runs_finished=runs_finished, result_docs=result_docs,
        result_writes=result_writes, webhooks=Counter({rid: webhooks.get(rid, 0) for rid in ids}),
        jobs_per_key={key: len(by_key.get(key, [])) for key in submitted.s3_keys},
        stuck=sorted(rid for rid, r in records.items() if r.status != "COMPLETED"),
        unexpected_webhooks=sorted(set(webhooks) - set(ids)),
    )
    store.redis.close()
    return result


# --- the Celery side of one job ------------------------------------------------------------------------
def job_of_message(raw: str | bytes) -> tuple[str | None, str | None]:
    """(request id, task id) of a raw kombu message (a queue list entry or an unacked entry)."""
    message = broker.decode(raw)
    if message is None or message.spec is None:
        return None, None
    return message.job_request_id, message.task_id


def task_ids_of(r: redis.Redis, request_id: str) -> set[str]:
    """Celery task ids of the broker messages for a job that workers hold right now."""
    return {task for rid, task in map(job_of_message, r.hvals(broker.UNACKED)) if rid == request_id}


def messages_of(r: redis.Redis, request_id: str, queue: str) -> int:
    """Broker messages carrying the job: waiting in the queue's lists plus held by workers."""
    waiting = [raw for name in broker.queue_lists(queue) for raw in r.lrange(name, 0, -1)]
    held = r.hvals(broker.UNACKED)
    return sum(job_of_message(raw)[0] == request_id for raw in [*waiting, *held])


def deliveries_of_task(log_dir: Path, task_id: str) -> int:
    """How many times workers received a message of this task (first delivery, redeliveries, retries)."""
    needle = f"[{task_id}] received"
    return sum(path.read_text(errors="replace").count(needle) for path in log_dir.glob("worker-*.log"))


@contextlib.contextmanager
def running_in_background(target: Callable[[], None]) -> Iterator[threading.Thread]:
    """Run `target` in a thread; re-raise its exception when the block ends."""
    errors: list[BaseException] = []

    def wrapped() -> None:
        try:
            target()
        except BaseException as exc:  # surfaced in the test's thread below
            errors.append(exc)

    thread = threading.Thread(target=wrapped, daemon=True)
    thread.start()
    yield thread
    thread.join(timeout=600)
    if errors:
        raise errors[0]


# --- load ----------------------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered), max(1, math.ceil(len(ordered) * q / 100))) - 1]


def stamp_arrivals(receiver: WebhookReceiver) -> None:
    """Give every webhook the receiver records its arrival time (`.at`)."""

    class Stamped(list):
        def append(self, item) -> None:
            item.at = time.time()
            super().append(item)

    receiver.received = Stamped(receiver.received)


def spread(values: list[float]) -> dict[str, float]:
    return {"p50": round(percentile(values, 50), 3), "p95": round(percentile(values, 95), 3),
            "max": round(max(values), 3) if values else float("nan")}


def run_load(stack: ChaosStack, receiver: WebhookReceiver, jobs: int, *, concurrency: int = 8,
             rate: float | None = None, timeout: float = 900) -> dict:
    """Submit `jobs` requests through the gateway (all at once, or `rate` per second), wait for every
    result and webhook, and measure: throughput, and per job submit → COMPLETED and submit → webhook."""
    from concurrent.futures import ThreadPoolExecutor

    stamp_arrivals(receiver)
    sent_at: dict[str, float] = {}
    submitter = GatewaySubmitter(stack.gateway_url, receiver.url)
    submitter.client = httpx.Client(base_url=stack.gateway_url, headers=auth(ALICE), timeout=60,
                                    limits=httpx.Limits(max_connections=concurrency))

    def one(n: int) -> None:
        began = time.time()
        sent_at[submitter.submit({"image_url": data_uri(small_png(n))})] = began

    started = time.time()
    with ThreadPoolExecutor(concurrency) as pool:
        futures = []
        for n in range(jobs):
            if rate:
                time.sleep(max(0.0, started + n / rate - time.time()))
            futures.append(pool.submit(one, n))
        for future in futures:
            future.result()
    submitter.close()
    submitted = Submitted(api=list(sent_at))
    wait_all_done(stack, submitted, receiver, timeout=timeout)
    store = stack.store()
    records = {rid: store.get(rid) for rid in sent_at}
    store.redis.close()
    arrivals = {}
    for item in list(receiver.received):
        arrivals.setdefault(item.json()["request_id"], []).append(item.at)
    finished = max(r.completed_at for r in records.values())
    return {
        "jobs": jobs, "ok": sum(r.ok for r in records.values()), "concurrency": concurrency, "rate": rate,
        "seconds": round(finished - started, 2), "throughput": round(jobs / (finished - started), 2),
        "latency": spread([r.completed_at - sent_at[rid] for rid, r in records.items()]),
        "webhook_latency": spread([min(arrivals[rid]) - sent_at[rid] for rid in records]),
        "run": spread([r.completed_at - r.started_at for r in records.values()]),
        "webhooks_per_job": sorted(Counter(len(arrivals.get(rid, [])) for rid in records).items()),
    }
