"""What the system costs without the network: the null model through the whole pipeline.

Part 1, plumbing: a loopback stack (devstack/loopback.py) whose `--workers` run
BIREFNET_BENCHMARK_NULL_MODEL=true; `--jobs` ~128x128 PNG requests with a webhook each from
`--concurrency` threads. Reports jobs/s and CPU ms per job of each of our processes (with children) and of
Redis, from /proc/<pid>/stat (moto and this process excluded).
Part 2, building blocks: client CPU ms per call of the S3, Redis and Celery calls a job makes.
Part 3, waiting callers: `--waiters` status streams and as many sync runs on requests that never start,
for `--seconds`: Redis commands per waiting client per second (INFO commandstats less the idle rate), for
this checkout's gateway and, with `--baseline-root`, another checkout's.

    python bench/bench_plumbing.py [--jobs 300] [--workers 1] [--concurrency 8]
    python bench/bench_plumbing.py --skip-plumbing --baseline-root /path/to/old/checkout
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchstack import KEY, auth, cpu_model, healthy, png_128, wait  # noqa: E402

from devstack.load import data_uri, run_load  # noqa: E402
from devstack.loopback import LoopbackStack  # noqa: E402
from devstack.receiver import WebhookReceiver  # noqa: E402
from devstack.services import MotoServer, RedisServer, free_port  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")
V2 = "/fal-ai/birefnet/v2"
QUEUE_V2 = f"/queue{V2}"
NEVER_RUNS = {"model": "General Use (Heavy)"}  # the stack's workers serve general-light only


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process and all its descendants (Celery pools, uvicorn workers)."""
    stats: dict[int, list[str]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            stats[int(entry)] = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
    children: dict[int, list[int]] = {}
    for child, fields in stats.items():
        children.setdefault(int(fields[1]), []).append(child)
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        if current in stats:
            total += (int(stats[current][11]) + int(stats[current][12])) / TICKS
        todo.extend(children.get(current, []))
    return total


def our_processes(stack: LoopbackStack) -> dict[str, int]:
    pids = {}
    for proc in stack.stack.processes:
        args = " ".join(proc.args) if isinstance(proc.args, list) else str(proc.args)
        if "gateway" in args:
            pids["gateway"] = proc.pid
        elif "-m deliverer" in args:
            pids["webhook deliverer"] = proc.pid
        elif "producer sqs" in args:
            pids["producer (SQS events, idle here)"] = proc.pid
    for name, proc in stack.workers.items():
        pids[name] = proc.pid
    return pids


def plumbing(args) -> None:
    receiver = WebhookReceiver().start()
    overrides = {
        "BIREFNET_BENCHMARK_NULL_MODEL": "true",
        "BIREFNET_WORKER_CONCURRENCY": str(args.worker_threads),
        "BIREFNET_TEST_OPERATING_RESOLUTION": "128x128",
    }
    with MotoServer() as moto, tempfile.TemporaryDirectory(prefix="bench-plumbing-") as logs:
        stack = LoopbackStack(Path(logs), moto.url, overrides=overrides, credential=KEY)
        try:
            stack.start(workers=args.workers, producer=True)
            run_load(stack, receiver, 20, concurrency=args.concurrency, timeout=600, image=png_128)  # warm-up
            pids = our_processes(stack)
            pids_redis = stack.redis.process.pid
            before = {name: cpu_seconds(pid) for name, pid in pids.items()}
            redis_before = cpu_seconds(pids_redis)
            figures = run_load(
                stack, receiver, args.jobs, concurrency=args.concurrency, timeout=3600, image=png_128
            )
            time.sleep(1.0)  # webhooks of the last jobs
            after = {name: cpu_seconds(pid) for name, pid in pids.items()}
            redis_after = cpu_seconds(pids_redis)
            banner = [
                line for line in stack.stack.tail("worker-1", 400).splitlines() if "NULL MODEL" in line
            ][:1]
        finally:
            stack.close()
            receiver.stop()
    jobs = figures["jobs"]
    assert figures["ok"] == jobs, f"{jobs - figures['ok']} jobs did not succeed"
    print(
        f"### Plumbing with the null model: {cpu_model()}, {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f}\n"
    )
    print(
        f"{jobs} jobs, ~128x128 PNG data URIs, webhook each, {args.concurrency} client threads, "
        f"{args.workers} worker process(es) x {args.worker_threads} job threads; worker log says: "
        f"{banner[0][-120:] if banner else '(no banner found)'}\n"
    )
    print(
        f"throughput {figures['throughput']:.1f} jobs/s; submit -> COMPLETED p50 "
        f"{figures['latency']['p50']:.2f} s, "
        f"webhook p50 {figures['webhook_latency']['p50']:.2f} s; webhooks per job "
        f"{figures['webhooks_per_job']}\n"
    )
    print("| process | CPU ms per job |")
    print("| --- | ---: |")
    ours = 0.0
    for name in pids:
        per_job = (after[name] - before[name]) / jobs * 1000
        ours += per_job
        print(f"| {name} | {per_job:.2f} |")
    print(f"| **our processes together** | **{ours:.2f}** |")
    print(f"| redis-server (AOF, fsync always) | {(redis_after - redis_before) / jobs * 1000:.2f} |")


# ---- building blocks ------------------------------------------------------------------------------


def per_call_ms(fn, calls: int) -> float:
    """Client CPU ms per call of `fn` (this thread only: the S3 server runs in a thread of this process),
    after a few warm-up calls."""
    for _ in range(5):
        fn()
    started = time.thread_time()
    for _ in range(calls):
        fn()
    return (time.thread_time() - started) / calls * 1000


def building_blocks(args) -> None:
    """What one call of each library a job goes through costs the calling process: the floor under the
    per-job figures above (server side excluded: moto and redis-server run in their own processes)."""
    import boto3
    from botocore.config import Config

    from common.adapters.queue import make_celery
    from common.settings import Settings
    from devstack.services import aws_client, stack_environment

    body = os.urandom(20_000)
    with MotoServer() as moto, RedisServer(appendonly=False) as server:
        settings = Settings(s3_endpoint_url=moto.url, redis_url=server.url, aws_region="us-east-1")
        env = stack_environment(os.environ, server.url, moto.url)  # the AWS credentials
        s3 = aws_client("s3", moto.url, settings, env)
        s3.create_bucket(Bucket="blocks")
        lean = boto3.client(
            "s3",
            region_name="us-east-1",
            endpoint_url=moto.url,
            config=Config(
                signature_version="s3v4",
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        )
        client = redis.Redis.from_url(server.url)
        celery = make_celery(settings)
        rows = [
            (
                "S3 put_object, 20 KB (boto3, our client)",
                lambda: s3.put_object(Bucket="blocks", Key="k", Body=body),
            ),
            (
                "S3 get_object + read, 20 KB (boto3, our client)",
                lambda: s3.get_object(Bucket="blocks", Key="k")["Body"].read(),
            ),
            (
                "S3 put_object, 20 KB (boto3, checksums only when required)",
                lambda: lean.put_object(Bucket="blocks", Key="k", Body=body),
            ),
            ("S3 head_object (boto3, our client)", lambda: s3.head_object(Bucket="blocks", Key="k")),
            ("Redis round trip (PING)", client.ping),
            (
                "Redis pipeline HSET + EXPIRE + PUBLISH",
                lambda: (
                    client.pipeline()
                    .hset("h", mapping={"a": 1, "b": 2})
                    .expire("h", 60)
                    .publish("c", "x")
                    .execute()
                ),
            ),
            (
                "Celery send_task (Redis broker)",
                lambda: celery.send_task("bench.noop", args=[{"x": 1}], queue="bench-blocks"),
            ),
        ]
        print(
            f"\n### Building blocks: client CPU ms per call ({args.block_calls} calls each, calling thread)\n"
        )
        print("| call | CPU ms |")
        print("| --- | ---: |")
        for name, fn in rows:
            print(f"| {name} | {per_call_ms(fn, args.block_calls):.2f} |")


# ---- waiting callers -----------------------------------------------------------------------------


def command_counts(client: redis.Redis) -> dict[str, int]:
    return {name: int(stats["calls"]) for name, stats in client.info("commandstats").items()}


def total_commands(client: redis.Redis) -> int:
    return sum(command_counts(client).values())


def measure_waiters(
    url: str, store_url: str, waiters: int, seconds: float, settle: float = 8.0
) -> tuple[float, float]:
    """(idle commands/s of the stack, extra commands per waiting client per second)."""
    client = redis.Redis.from_url(store_url)
    http = httpx.Client(base_url=url, headers=auth(), timeout=None)
    start = total_commands(client)
    time.sleep(seconds)
    idle_rate = (total_commands(client) - start - 1) / seconds
    ids = [
        http.post(QUEUE_V2, json={"image_url": data_uri(png_128(n)), **NEVER_RUNS}).json()["request_id"]
        for n in range(waiters)
    ]
    stop = threading.Event()

    def stream(rid: str) -> None:
        with (
            contextlib.suppress(httpx.HTTPError),
            httpx.Client(base_url=url, headers=auth(), timeout=None) as c,
            c.stream("GET", f"/queue/fal-ai/birefnet/requests/{rid}/status/stream") as response,
        ):
            for _ in response.iter_lines():
                if stop.is_set():
                    return

    def run(n: int) -> None:
        with (
            httpx.Client(base_url=url, headers=auth(), timeout=httpx.Timeout(None)) as c,
            contextlib.suppress(httpx.HTTPError),
        ):
            c.post(V2, json={"image_url": data_uri(png_128(1000 + n)), **NEVER_RUNS}, timeout=seconds + 15)

    threads = [threading.Thread(target=stream, args=(rid,), daemon=True) for rid in ids]
    threads += [threading.Thread(target=run, args=(n,), daemon=True) for n in range(waiters)]
    for thread in threads:
        thread.start()
    time.sleep(settle)  # everyone connected and waiting
    counts = command_counts(client)
    time.sleep(seconds)
    after = command_counts(client)
    waiting_rate = (sum(after.values()) - sum(counts.values()) - 1) / seconds
    busiest = sorted(((after[k] - counts.get(k, 0), k) for k in after), reverse=True)[:4]
    print(f"{url}: commands while waiting: {busiest}", file=sys.stderr)
    stop.set()
    http.close()
    return idle_rate, (waiting_rate - idle_rate) / (2 * waiters)


def waiting(args) -> None:
    rows = []
    with MotoServer() as moto, tempfile.TemporaryDirectory(prefix="bench-waiting-") as logs:
        stack = LoopbackStack(Path(logs), moto.url, credential=KEY)
        try:
            stack.start(workers=0, producer=False, webhooks=False)
            idle, per_client = measure_waiters(
                stack.gateway_url, stack.settings.redis_url, args.waiters, args.seconds
            )
            rows.append(("this checkout (pub/sub)", idle, per_client))
            if args.baseline_root:
                port = free_port()
                services = dataclasses.replace(
                    stack.stack, root=Path(args.baseline_root), processes=[], named={}, logs=[]
                )
                baseline = services.start_gateway(port, name="gateway-baseline")
                try:
                    url = f"http://127.0.0.1:{port}"
                    wait(lambda: healthy(url), 60, "the baseline gateway")
                    # stop ours so that only the baseline's sweeper and waiters count
                    for proc in stack.stack.processes:
                        proc.kill()
                    time.sleep(1.0)
                    idle, per_client = measure_waiters(
                        url, stack.settings.redis_url, args.waiters, args.seconds
                    )
                    rows.append((f"baseline {args.baseline_root} (polling)", idle, per_client))
                finally:
                    baseline.kill()  # open streams would hold a graceful shutdown
                    baseline.wait(timeout=10)
        finally:
            stack.close()
    print(
        f"\n### Waiting callers: {args.waiters} status streams + {args.waiters} sync runs on requests that "
        f"never start, {args.seconds:.0f} s\n"
    )
    print("| gateway | stack idle (commands/s) | Redis commands per waiting client per second |")
    print("| --- | ---: | ---: |")
    for name, idle, per_client in rows:
        print(f"| {name} | {idle:.1f} | {per_client:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--worker-threads", type=int, default=4, help="BIREFNET_WORKER_CONCURRENCY")
    parser.add_argument("--concurrency", type=int, default=8, help="client threads submitting")
    parser.add_argument("--waiters", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--baseline-root", help="checkout whose gateway is the 'before' row of part 2")
    parser.add_argument("--skip-plumbing", action="store_true")
    parser.add_argument("--skip-waiting", action="store_true")
    parser.add_argument("--skip-blocks", action="store_true")
    parser.add_argument("--block-calls", type=int, default=200, help="calls per building-block row")
    args = parser.parse_args()
    if not args.skip_plumbing:
        plumbing(args)
    if not args.skip_blocks:
        building_blocks(args)
    if not args.skip_waiting:
        waiting(args)


if __name__ == "__main__":
    main()
