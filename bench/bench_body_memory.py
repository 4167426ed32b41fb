"""Peak gateway memory per request body: what one submit with a data URI of 1, 10 and 39 MB adds to the
gateway's resident memory (VmHWM, the process's peak, minus its resident size just before), and what four
39 MB submits sent at once add (the large-body budget's case).

`python bench/bench_body_memory.py [--old-ref REF]`: each row starts a fresh `python -m gateway`
(auth off, no worker: the job only queues) on loopback Redis and moto S3. With --old-ref, the same rows run
first with the gateway of that git revision (checked out in a temporary worktree): the baseline, in the same
run on the same machine.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.benchstack import cpu_model, healthy, wait  # noqa: E402
from devstack.builder import Stack, build_stack  # noqa: E402
from devstack.services import MotoServer, RedisServer, free_port  # noqa: E402

MB = 1_000_000
SIZES_MB = (1, 10, 39)
PATH = "/queue/fal-ai/birefnet/v2"


def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def body_of(size: int) -> bytes:
    """A submit body of about `size` bytes: one data URI (random bytes: nothing compresses)."""
    payload = base64.b64encode(os.urandom((size - 100) * 3 // 4))
    return b'{"image_url": "data:image/png;base64,' + payload + b'"}'


@contextlib.contextmanager
def gateway(tree: Path, stack: Stack) -> Iterator[tuple[str, int]]:
    """`python -m gateway` of checkout `tree` with the stack's environment, on a free port."""
    port = free_port()
    services = dataclasses.replace(stack, root=tree, processes=[], named={}, logs=[])
    proc = services.start_gateway(port, name=f"gateway-{port}")
    url = f"http://127.0.0.1:{port}"
    try:
        wait(lambda: healthy(url), 60, "the gateway")
        yield url, proc.pid
    finally:
        services.stop_all()


def measure(tree: Path, stack: Stack, bodies: list[bytes]) -> tuple[float, list[int]]:
    """MB the gateway's peak grows by while answering `bodies` (sent at once), and their status codes."""
    with gateway(tree, stack) as (url, pid), httpx.Client(base_url=url, timeout=120) as client:
        client.post(PATH, json={"image_url": "https://example.com/warm-up.png"}).raise_for_status()
        time.sleep(0.5)
        before = status_kb(pid, "VmRSS")
        codes: list[int] = [0] * len(bodies)

        def send(index: int) -> None:
            codes[index] = client.post(
                PATH, content=bodies[index], headers={"content-type": "application/json"}
            ).status_code

        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return (status_kb(pid, "VmHWM") - before) / 1000, codes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old-ref", help="git revision whose gateway gives the baseline rows")
    args = parser.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="bench-body-memory-"))
    trees = [("this tree", ROOT)]
    old_tree = None
    if args.old_ref:
        old_tree = logs / "old"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(old_tree), args.old_ref],
            check=True,
        )
        trees.insert(0, (f"old ({args.old_ref[:12]})", old_tree))
    print(f"# bench_body_memory: {cpu_model()}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}")
    print("| gateway | request | peak growth (MB) | answers |")
    print("| --- | --- | --- | --- |")
    try:
        with RedisServer(appendonly=False) as redis_server, MotoServer() as moto:
            stack = build_stack(
                redis_server.url,
                moto.url,
                {
                    "BIREFNET_GATEWAY_AUTH": "off",
                    "BIREFNET_GATEWAY_HOST": "127.0.0.1",
                    "BIREFNET_ALLOW_DEV_SECRETS": "true",
                    "BIREFNET_WORKER_METRICS_PORT": "0",
                },
                log_dir=logs,
                environ=os.environ,
            )
            for label, tree in trees:
                for size in SIZES_MB:
                    growth, codes = measure(tree, stack, [body_of(size * MB)])
                    print(f"| {label} | one {size} MB submit | {growth:.0f} | {codes} |", flush=True)
                growth, codes = measure(tree, stack, [body_of(39 * MB) for _ in range(4)])
                print(
                    f"| {label} | four 39 MB submits at once | {growth:.0f} | {sorted(codes)} |", flush=True
                )
    finally:
        if old_tree is not None:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old_tree)], check=False
            )
    if not args.old_ref:
        print("| old (before the body budget; figure from the security review) | one 39 MB submit | ~184 | |")


if __name__ == "__main__":
    main()
