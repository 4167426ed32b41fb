"""Redis CPU per job with Redis alone: one job's commands, made by the product's own calls, from one client.

`bench_redis_budget.py` measures Redis inside the whole loopback stack, where the gateway, the worker, the
deliverer and the client threads share this machine's CPUs with redis-server. Here nothing else runs: for
each of `--jobs` jobs this process makes, in order, the calls the stack makes (the gateway's
`JobStore.create_queued` with its output-retention booking and the Celery message (`job_message`), the
BRPOP kombu's consumer sends, `JobStore.claim`, `JobStore.complete` with the job's log lines (an unwatched
job's lines go with its completion) and the webhook's booking, the deliverer's BRPOP on the ready list and
`WebhookSender.deliver_handed` posting to a receiver on loopback, its outcome written with the next job's
pop as the deliverer writes it), against a redis-server with AOF under each `--appendfsync` policy.
Reported per job: Redis commands (INFO commandstats, script commands included), round trips (requests
read, INFO stats) and Redis CPU (INFO cpu); and a PING's Redis CPU right after, the machine's speed then.

    python bench/bench_redis_alone.py [--jobs 1000] [--appendfsync always everysec] [--clients 1 4 16]
        [--wake-costs]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import cast

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchstack import cpu_model, png_128  # noqa: E402

from common.adapters import broker  # noqa: E402
from common.adapters.queue import job_message, make_celery  # noqa: E402
from common.domain.schemas import JobParams, JobSpec  # noqa: E402
from common.domain.signing import WebhookSigner  # noqa: E402
from common.settings import Settings  # noqa: E402
from common.state import keys  # noqa: E402
from common.state.jobs import JobStore, RunReport, log_entry  # noqa: E402
from common.state.webhooks import Handoff, OutcomeOutbox, WebhookSender, first_attempt_due  # noqa: E402
from deliverer.app import Deliverer  # noqa: E402
from devstack.builder import signing_seed  # noqa: E402
from devstack.load import data_uri  # noqa: E402
from devstack.receiver import WebhookReceiver  # noqa: E402
from devstack.services import RedisServer  # noqa: E402


def totals(client: redis.Redis) -> tuple[int, int, float]:
    """Commands run, requests read (round trips) and CPU seconds so far, from one INFO."""
    info = client.info("all")
    calls = sum(int(stats["calls"]) for name, stats in info.items() if name.startswith("cmdstat_"))
    return (
        calls,
        int(info["total_reads_processed"]),
        float(info["used_cpu_sys"]) + float(info["used_cpu_user"]),
    )


def one_job(store: JobStore, celery, deliverer: Deliverer, receiver_url: str, n: int) -> None:
    sender = deliverer.sender
    rid = str(uuid.uuid4())
    spec = JobSpec(
        request_id=rid,
        variant="general-light",
        image_url=data_uri(png_128(n)),
        params=JobParams(),
        output_prefix=f"results/requests/{rid}/",
        webhook_url=receiver_url,
        owner="bench",
    )
    retention = {keys.OUTPUTS: (f"req:{rid}", time.time() + 900)}
    store.create_queued(spec, retention, message=job_message(celery, spec))  # the gateway
    store.redis.brpop(broker.queue_lists(spec.queue), 1)  # the worker's consumer takes the message
    claim = store.claim(
        rid,
        spec.variant,
        "token",
        lease_seconds=30,
        max_attempts=3,
        worker="bench",
        sole_log_writer=True,
        first_line=log_entry("loading image"),
    )
    assert claim.outcome == "claimed", claim
    lines = ["inference 128x128 on cpu", "uploading", "done in 0.01s"]
    done = store.complete(
        rid,
        token="token",
        result={"image": {"url": "http://127.0.0.1/x.png"}},
        variant=spec.variant,
        logs=[log_entry(line) for line in lines],
        webhook_due=first_attempt_due(sender.settings),
        report=RunReport("done", "bench", 0.01),  # the completions-stream entry, as the worker writes it
    )
    assert done, rid
    # The deliverer's pop, with the previous attempt's outcome in the same round trip.
    popped = cast(tuple[str, str], deliverer.write_outcomes_and_pop())
    handoff = Handoff.parse(popped[1])
    assert handoff is not None, popped
    attempt = sender.deliver_handed(handoff)  # its outcome waits in the outbox for the next pop
    assert attempt is not None and attempt.ok, attempt


def measure(fsync: str, jobs: int, clients: int) -> tuple[float, float, float, float, float]:
    """Jobs/s; per job: commands, round trips, Redis CPU ms; and a PING's Redis CPU in µs right after."""
    server = RedisServer().start()
    receiver = WebhookReceiver().start()
    try:
        settings = Settings(
            redis_url=server.url, webhook_signing_keys=[signing_seed()], fetch_allow_networks=("127.0.0.0/8",)
        )
        client = redis.Redis.from_url(server.url)
        client.config_set("appendfsync", fsync)
        store = JobStore.from_settings(settings)
        celery = make_celery(settings)
        signer = WebhookSigner.from_keys(settings.webhook_signing_keys)
        deliverer = Deliverer(settings, store, WebhookSender(settings, store, signer, OutcomeOutbox()))
        for n in range(20):  # scripts loaded, connections open
            one_job(store, celery, deliverer, receiver.url, n)
        calls, reads, cpu = totals(client)
        started = time.monotonic()
        with ThreadPoolExecutor(clients) as pool:  # each job's calls in order; `clients` jobs at a time
            list(pool.map(lambda n: one_job(store, celery, deliverer, receiver.url, 100 + n), range(jobs)))
        seconds = time.monotonic() - started
        after_calls, after_reads, after_cpu = totals(client)
        pings = 2000
        for _ in range(pings):
            client.ping()
        ping_cpu = totals(client)[2] - after_cpu
        return (  # less our INFO
            jobs / seconds,
            (after_calls - calls - 1) / jobs,
            (after_reads - reads - 1) / jobs,
            (after_cpu - cpu) / jobs * 1000,
            ping_cpu / pings * 1e6,
        )
    finally:
        receiver.stop()
        server.stop()


def wake_costs(gaps_ms: list[float]) -> None:
    """What a PING costs Redis (less its idle rate) by the time between PINGs: a request that finds Redis
    asleep costs it more than one that finds it awake."""
    server = RedisServer().start()
    try:
        client = redis.Redis.from_url(server.url)
        cpu = lambda: totals(client)[2]  # noqa: E731
        before, started = cpu(), time.monotonic()
        time.sleep(5)
        idle = (cpu() - before) / (time.monotonic() - started)
        print(
            f"\nA PING's Redis CPU by the time between PINGs (idle rate {idle * 1000:.2f} ms/s, taken off):\n"
        )
        print("| time between PINGs | Redis CPU per PING, µs |")
        print("| ---: | ---: |")
        for gap_ms in gaps_ms:
            pings = 2000 if gap_ms < 5 else 600
            before, started = cpu(), time.monotonic()
            for _ in range(pings):
                client.ping()
                if gap_ms:
                    time.sleep(gap_ms / 1000)
            used = cpu() - before - idle * (time.monotonic() - started)
            print(f"| {gap_ms:g} ms | {used / pings * 1e6:.1f} |")
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--appendfsync", nargs="+", default=["always", "everysec"])
    parser.add_argument(
        "--clients",
        type=int,
        nargs="+",
        default=[1],
        help="threads making jobs at once (more: Redis idles less between requests, as under a fleet)",
    )
    parser.add_argument(
        "--wake-costs",
        type=float,
        nargs="*",
        metavar="MS",
        help="also a PING's Redis CPU by the time between PINGs (ms; none given: 0 1 5 25)",
    )
    args = parser.parse_args()
    print(
        f"### Redis alone, one job's commands from one client: {cpu_model()}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}, {args.jobs} jobs\n"
    )
    print(
        "| fsync | clients | jobs/s | Redis commands per job | round trips per job | Redis CPU ms per job "
        "| a PING's, µs |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for fsync in args.appendfsync:
        for clients in args.clients:
            rate, commands, round_trips, cpu_ms, ping_us = measure(fsync, args.jobs, clients)
            print(
                f"| {fsync} | {clients} | {rate:.0f} | {commands:.1f} | {round_trips:.1f} | {cpu_ms:.3f} "
                f"| {ping_us:.0f} |"
            )
    if args.wake_costs is not None:
        wake_costs(args.wake_costs or [0, 1, 5, 25])


if __name__ == "__main__":
    main()
