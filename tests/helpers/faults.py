"""Fault injection for the chaos, poison and hang tests (no tests here).

`ChaosStack`: devstack's loopback stack (tests' API keys) whose redis-server can be crashed and restarted on
the same port and data directory, whose S3 sits behind a cuttable `TcpProxy`, and whose busy workers can be
killed; `OomKiller` plays the kernel's OOM killer; `submit_mixed` sends gateway requests and S3 uploads while
faults happen. Every wait is bounded in time; nothing binds anything but 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from common.state import keys, ops_state
from devstack import load
from devstack.load import Submitted, data_uri
from devstack.loopback import VARIANT, LoopbackStack
from tests.helpers.gateway import ALICE, api_keys_setting
from tests.helpers.images import small_png
from tests.helpers.proxies import TcpProxy
from tests.helpers.stack import HOOKED_WORKER, wait_for

V2 = load.V2


class GatewaySubmitter(load.GatewaySubmitter):
    """devstack's submitter with the tests' key (ALICE) unless told otherwise."""

    def __init__(self, base_url: str, webhook_url: str | None, credential: str = ALICE):
        super().__init__(base_url, webhook_url, credential)


@dataclass
class ChaosStack(LoopbackStack):
    """The loopback stack with the tests' keys; S3 through a cuttable proxy unless `s3_proxy` is False (load
    runs, where nothing is cut)."""

    s3_proxy: bool = True
    credential: str = ALICE
    worker_module: str = HOOKED_WORKER
    proxy: TcpProxy = field(init=False)
    redis_restarts: int = 0

    def api_keys(self, input_bucket: str) -> str:
        return api_keys_setting(input_bucket)

    def s3_url(self) -> str:
        """Only S3 goes through the cuttable proxy."""
        self.proxy = TcpProxy(int(self.moto_url.rsplit(":", 1)[1])).start()
        return self.proxy.url if self.s3_proxy else self.moto_url

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
        super().close()


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


def upload(s3, bucket: str, key: str, body: bytes, metadata: dict[str, str], attempts: int = 20) -> None:
    for attempt in range(attempts):
        try:
            s3.put_object(Bucket=bucket, Key=key, Body=body, Metadata=metadata)
            return
        except Exception:  # moto itself is never cut; this only guards against a hiccup
            if attempt == attempts - 1:
                raise
            time.sleep(0.2)


def submit_mixed(
    stack: ChaosStack,
    count: int,
    rate: float,
    webhook_url: str | None,
    out: Submitted,
    stop: threading.Event,
    api_share: float = 0.5,
    prefix: str = "chaos",
) -> None:
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
