"""Redis budget per job: commands by command, Redis CPU, and our processes' CPU, this checkout beside a
baseline.

For each checkout (`--baseline-root` first, when given, then this one) a loopback stack (devstack/
loopback.py: AOF Redis, moto S3, gateway, webhook deliverer, `--workers` null-model workers)
runs `--jobs` ~128x128 PNG requests with a webhook each from `--concurrency` threads. The measurement
window opens after a warm-up and closes once the last webhook arrived; the harness itself sends Redis
nothing inside it (completion is seen at the webhook receiver); `--appendfsync` sets Redis's AOF fsync
policy. Commands run inside Lua scripts count, as INFO commandstats counts them. Reported per job:
Redis commands by command (INFO commandstats deltas), round trips (requests read, INFO stats
total_reads_processed), Redis CPU (INFO cpu used_cpu_sys + used_cpu_user), and CPU of each of our processes
with children (/proc). After the window, 2,000 PINGs give what a bare round trip costs Redis at that moment:
this virtual machine's speed moves over an hour, and a job's cost moves with it.

    python bench/bench_redis_budget.py --jobs 300 --baseline-root /tmp/redis-baseline [--pin-redis]

`--pin-redis` puts redis-server alone on one CPU and the rest on the others, so Redis's CPU per job is not
inflated by the stack's processes taking turns on its core (on a 2-CPU machine the stack then runs on one).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_plumbing import cpu_seconds, our_processes  # noqa: E402
from benchstack import KEY, cpu_model, png_128  # noqa: E402

from devstack.load import GatewaySubmitter, data_uri  # noqa: E402
from devstack.loopback import LoopbackStack  # noqa: E402
from devstack.receiver import WebhookReceiver  # noqa: E402
from devstack.services import MotoServer  # noqa: E402


@dataclass
class Run:
    label: str
    jobs: int
    seconds: float
    commands: dict[str, int]  # per-command call deltas over the window
    round_trips: int  # requests Redis read over the window
    redis_cpu: float  # seconds
    processes: dict[str, float]  # seconds of CPU by process
    idle_commands_per_s: float
    idle_redis_cpu_per_s: float  # seconds of Redis CPU per second with no jobs (sweeps, polls, serverCron)
    ping_cpu: float  # seconds of Redis CPU for one PING, right after the window
    objects: dict[str, float]  # S3 objects written per job, by bucket role


@dataclass
class Sample:
    """Redis's counters at one moment, from one INFO (one command, one round trip)."""

    commands: dict[str, int]
    cpu: float  # seconds, INFO cpu used_cpu_sys + used_cpu_user
    reads: int  # requests read from clients (total_reads_processed)

    @classmethod
    def of(cls, client: redis.Redis) -> Sample:
        info = client.info("all")
        return cls(
            {
                name.removeprefix("cmdstat_"): int(stats["calls"])
                for name, stats in info.items()
                if name.startswith("cmdstat_")
            },
            float(info["used_cpu_sys"]) + float(info["used_cpu_user"]),
            int(info["total_reads_processed"]),
        )


def ping_cpu(client: redis.Redis, pings: int = 2000) -> float:
    """Seconds of Redis CPU one PING costs now: a bare round trip's price on this machine at this moment."""
    before = Sample.of(client).cpu
    for _ in range(pings):
        client.ping()
    return (Sample.of(client).cpu - before) / pings


ALL_CPUS = sorted(os.sched_getaffinity(0))  # before any pinning: each run pins afresh


def pin_tree(pid: int, cpus: set[int]) -> None:
    """Every thread of `pid` and of its descendants onto `cpus` (threads started later inherit it)."""
    parents: dict[int, int] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            parents[int(entry)] = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
    todo = [pid]
    while todo:
        current = todo.pop()
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{current}/task"):
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(task), cpus)
        todo.extend(child for child, parent in parents.items() if parent == current)


def pin_redis_apart(stack: LoopbackStack) -> None:
    """redis-server alone on the first CPU this process may use, everything else (our processes, moto and
    the client threads, which live in this process) on the others: Redis's CPU per job without other
    processes competing for its core, as on a deployed Redis."""
    cpus = ALL_CPUS
    if len(cpus) < 2:
        raise SystemExit("--pin-redis needs at least two CPUs")
    rest = set(cpus[1:])
    for pid in [*our_processes(stack).values(), os.getpid()]:
        pin_tree(pid, rest)
    assert stack.redis.process is not None, "the stack's redis-server runs"
    pin_tree(stack.redis.process.pid, {cpus[0]})


def delivered(receiver: WebhookReceiver) -> set[str]:
    return {item.json()["request_id"] for item in list(receiver.received)}


def load(
    stack: LoopbackStack, receiver: WebhookReceiver, jobs: int, concurrency: int, first: int
) -> list[str]:
    """Submit `jobs` requests and wait (at the receiver, not in Redis) for every webhook."""
    submitter = GatewaySubmitter(stack.gateway_url, receiver.url, stack.credential)
    with ThreadPoolExecutor(concurrency) as pool:
        ids = list(
            pool.map(
                lambda n: submitter.submit({"image_url": data_uri(png_128(n))}), range(first, first + jobs)
            )
        )
    submitter.close()
    deadline = time.time() + 60 + jobs
    while not set(ids) <= delivered(receiver):
        if time.time() > deadline:
            raise TimeoutError(f"{len(set(ids) - delivered(receiver))} webhooks missing")
        time.sleep(0.05)
    return ids


def measure(label: str, root: Path, fsync: str, args) -> Run:
    receiver = WebhookReceiver().start()
    overrides = {
        "BIREFNET_BENCHMARK_NULL_MODEL": "true",
        "BIREFNET_WORKER_CONCURRENCY": str(args.worker_threads),
        "BIREFNET_TEST_OPERATING_RESOLUTION": "128x128",
    }
    with MotoServer() as moto, tempfile.TemporaryDirectory(prefix="bench-budget-") as logs:
        stack = LoopbackStack(Path(logs), moto.url, overrides=overrides, credential=KEY, root=root)
        try:
            stack.start(workers=args.workers, producer=False)
            client = redis.Redis.from_url(stack.settings.redis_url)
            client.config_set("appendfsync", fsync)  # the stack's Redis starts with AOF, fsync always
            if args.pin_redis:
                pin_redis_apart(stack)
            load(stack, receiver, args.warmup, args.concurrency, 0)
            time.sleep(1.0)
            idle_from = Sample.of(client)
            time.sleep(args.idle_seconds)
            idle_to = Sample.of(client)
            idle = (sum(idle_to.commands.values()) - sum(idle_from.commands.values()) - 1) / args.idle_seconds
            idle_cpu = (idle_to.cpu - idle_from.cpu) / args.idle_seconds
            pids = our_processes(stack)
            before = {name: cpu_seconds(pid) for name, pid in pids.items()}
            window_from, started = Sample.of(client), time.time()
            ids = load(stack, receiver, args.jobs, args.concurrency, 10_000)
            seconds = time.time() - started
            window_to = Sample.of(client)  # and one INFO of ours
            ping = ping_cpu(client)
            after = {name: cpu_seconds(pid) for name, pid in pids.items()}
            s3 = stack.s3_direct()
            objects = {}
            for role, bucket in (
                ("input", stack.settings.input_bucket),
                ("output", stack.settings.output_bucket),
            ):
                keys = [
                    o["Key"]
                    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
                    for o in page.get("Contents", [])
                ]
                objects[role] = len(keys) / (args.jobs + args.warmup)
            store = stack.store()
            failed = [rid for rid in ids if not (record := store.get(rid)) or not record.ok]
            store.redis.close()
            client.close()
            assert not failed, f"{len(failed)} jobs did not succeed"
        finally:
            stack.close()
            receiver.stop()
            if args.pin_redis:
                pin_tree(os.getpid(), set(ALL_CPUS))
    deltas = {
        name: window_to.commands[name] - window_from.commands.get(name, 0) for name in window_to.commands
    }
    deltas["info"] -= 1  # this benchmark's own INFO
    return Run(
        label,
        args.jobs,
        seconds,
        {k: v for k, v in deltas.items() if v > 0},
        window_to.reads - window_from.reads - 1,
        window_to.cpu - window_from.cpu,
        {name: after[name] - before[name] for name in pids},
        idle,
        idle_cpu,
        ping,
        objects,
    )


def report(runs: list[Run]) -> None:
    print(
        f"### Redis budget per job: {cpu_model()}, {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f}\n"
    )
    print("| | " + " | ".join(run.label for run in runs) + " |")
    print("| --- |" + " ---: |" * len(runs))
    print("| jobs/s | " + " | ".join(f"{run.jobs / run.seconds:.1f}" for run in runs) + " |")
    print(
        "| idle stack, Redis commands/s | "
        + " | ".join(f"{run.idle_commands_per_s:.1f}" for run in runs)
        + " |"
    )
    print(
        "| **Redis commands per job** | "
        + " | ".join(f"**{sum(run.commands.values()) / run.jobs:.1f}**" for run in runs)
        + " |"
    )
    print(
        "| Redis round trips per job | "
        + " | ".join(f"{run.round_trips / run.jobs:.1f}" for run in runs)
        + " |"
    )
    print(
        "| **Redis CPU ms per job** | "
        + " | ".join(f"**{run.redis_cpu / run.jobs * 1000:.2f}**" for run in runs)
        + " |"
    )
    print(
        "| idle stack, Redis CPU ms/s | "
        + " | ".join(f"{run.idle_redis_cpu_per_s * 1000:.1f}" for run in runs)
        + " |"
    )
    # What a job adds: the window's totals less what the stack does per second anyway (at a fleet's rate
    # of jobs the per-second costs spread thin).
    print(
        "| Redis commands per job, less the idle rate | "
        + " | ".join(
            f"{(sum(run.commands.values()) - run.idle_commands_per_s * run.seconds) / run.jobs:.1f}"
            for run in runs
        )
        + " |"
    )
    print(
        "| Redis CPU ms per job, less the idle rate | "
        + " | ".join(
            f"{(run.redis_cpu - run.idle_redis_cpu_per_s * run.seconds) / run.jobs * 1000:.2f}"
            for run in runs
        )
        + " |"
    )
    print(
        "| a PING's Redis CPU, µs (the machine's speed then) | "
        + " | ".join(f"{run.ping_cpu * 1e6:.0f}" for run in runs)
        + " |"
    )
    names = sorted({n for run in runs for n in run.processes})
    for name in names:
        print(
            f"| CPU ms per job: {name} | "
            + " | ".join(f"{run.processes.get(name, 0) / run.jobs * 1000:.2f}" for run in runs)
            + " |"
        )
    print(
        "| **CPU ms per job, our processes** | "
        + " | ".join(f"**{sum(run.processes.values()) / run.jobs * 1000:.2f}**" for run in runs)
        + " |"
    )
    for role in ("input", "output"):
        print(
            f"| S3 objects per job, {role} bucket | "
            + " | ".join(f"{run.objects.get(role, 0):.2f}" for run in runs)
            + " |"
        )
    print("\nCommands per job, by command:\n")
    print("| command | " + " | ".join(run.label for run in runs) + " |")
    print("| --- |" + " ---: |" * len(runs))
    commands = sorted(
        {c for run in runs for c in run.commands}, key=lambda c: -max(r.commands.get(c, 0) for r in runs)
    )
    for command in commands:
        print(
            f"| {command} | "
            + " | ".join(f"{run.commands.get(command, 0) / run.jobs:.2f}" for run in runs)
            + " |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--worker-threads", type=int, default=4, help="BIREFNET_WORKER_CONCURRENCY")
    parser.add_argument("--concurrency", type=int, default=8, help="client threads submitting")
    parser.add_argument("--idle-seconds", type=float, default=3.0)
    parser.add_argument("--baseline-root", type=Path, help="checkout measured first, as the baseline column")
    parser.add_argument(
        "--appendfsync",
        nargs="+",
        default=["always"],
        choices=["always", "everysec", "no"],
        help="Redis AOF fsync policies to measure each checkout under",
    )
    parser.add_argument(
        "--pin-redis",
        action="store_true",
        help="redis-server alone on one CPU, the rest of the stack and the clients on the others",
    )
    args = parser.parse_args()
    runs = []
    for fsync in args.appendfsync:
        if args.baseline_root:
            runs.append(measure(f"baseline, fsync {fsync}", args.baseline_root.resolve(), fsync, args))
        runs.append(measure(f"this checkout, fsync {fsync}", ROOT, fsync, args))
    if args.pin_redis:
        print("redis-server pinned alone to one CPU, everything else to the others\n")
    with contextlib.suppress(BrokenPipeError):
        report(runs)


if __name__ == "__main__":
    main()
