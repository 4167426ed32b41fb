"""Redis shards, simulated: null-model workers across 1, 2 and 3 redis-server processes.

Three variants (general-light, general-heavy, portrait), one null-model worker each. With S shards the
variants are split over S redis-servers (BIREFNET_REDIS_SHARDS; the workers pick their shard from it, as
deployed workers do). `--jobs` jobs are submitted the way the gateway does (job record and Celery message
in one script call) on the shard of their variant, round-robin over the variants, with request ids naming
their shard (common.state.shards). Reported per shard: jobs, Redis CPU ms per job (INFO cpu), Redis
commands per job, the Redis core's busy share, and the ceiling they imply: the rate of jobs (this mix of
variants) at which the busiest shard's Redis core is full.
On a small machine the workers' own CPU caps the measured jobs/s long before Redis does; the ceiling is
what Redis alone would allow.

    python bench/bench_shards.py [--jobs 300] [--shards 1 2 3] [--appendfsync everysec]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import redis
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchstack import cpu_model  # noqa: E402

from common.adapters.queue import job_message, make_celery  # noqa: E402
from common.domain.schemas import JobParams, JobSpec  # noqa: E402
from common.state import keys  # noqa: E402
from common.state.jobs import JobStore  # noqa: E402
from common.state.shards import ShardMap, settings_for  # noqa: E402
from devstack.builder import build_stack  # noqa: E402
from devstack.loopback import loopback_values  # noqa: E402
from devstack.services import MotoServer, RedisServer  # noqa: E402

VARIANTS = ["general-light", "general-heavy", "portrait"]


def data_uri(seed: int) -> str:
    import base64

    image = Image.new("RGB", (128, 128), ((seed * 37) % 256, (seed * 91) % 256, 80))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def redis_cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def total_commands(client: redis.Redis) -> int:
    return sum(int(stats["calls"]) for stats in client.info("commandstats").values())


def simulate(count: int, args, moto_url: str, logs: Path) -> list[dict]:
    groups = [VARIANTS[i::count] for i in range(count)]  # shard i serves groups[i]
    with ExitStack() as stack:
        servers = [stack.enter_context(RedisServer()) for _ in range(count)]
        for server in servers:
            redis.Redis.from_url(server.url).config_set("appendfsync", args.appendfsync)
        shards_setting = [
            {"url": server.url, "variants": group}
            for server, group in zip(servers[1:], groups[1:], strict=True)
        ]
        services = build_stack(
            servers[0].url,
            moto_url,
            loopback_values(
                **{
                    "BIREFNET_REDIS_SHARDS": json.dumps(shards_setting),
                    "BIREFNET_BENCHMARK_NULL_MODEL": "true",
                    "BIREFNET_VARIANT_OVERRIDES": json.dumps(
                        {v: {"backbone": "swin_v1_nano", "weights": "recipe"} for v in VARIANTS}
                    ),  # no downloads
                    "BIREFNET_WORKER_CONCURRENCY": "2",
                }
            ),
            log_dir=logs,
            environ=os.environ,
        )
        settings = services.settings
        shard_map = ShardMap.from_settings(settings)
        stack.callback(services.stop_all)
        for variant in VARIANTS:
            services.start_worker(variant, name=f"worker-{count}-{variant}", wait=False)
        for variant in VARIANTS:
            services.wait_ready(f"worker-{count}-{variant}", 180)
        per_shard = [settings_for(settings, shard) for shard in shard_map.shards]
        stores = [JobStore.from_url(s.redis_url) for s in per_shard]
        celeries = [make_celery(s) for s in per_shard]
        clients = [redis.Redis.from_url(s.url) for s in servers]
        images = [data_uri(n) for n in range(16)]

        def submit(n: int) -> None:
            variant = VARIANTS[n % len(VARIANTS)]
            shard = shard_map.for_variant(variant)
            rid = shard_map.new_request_id(variant)
            spec = JobSpec(
                request_id=rid,
                variant=variant,
                image_url=images[n % 16],
                params=JobParams(),
                output_prefix=f"bench-shards/{rid}/",
                owner="bench",
            )
            stores[shard.index].create_queued(spec, message=job_message(celeries[shard.index], spec))

        expected = [
            sum(1 for n in range(args.jobs) if shard_map.for_variant(VARIANTS[n % 3]).index == i)
            for i in range(count)
        ]
        cpu = [redis_cpu(c) for c in clients]
        commands = [total_commands(c) for c in clients]
        done = [c.xlen(keys.COMPLETIONS) for c in clients]
        started = time.time()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(submit, range(args.jobs)))
        while any(c.xlen(keys.COMPLETIONS) - d < e for c, d, e in zip(clients, done, expected, strict=True)):
            if time.time() - started > 600:
                raise TimeoutError("jobs did not finish")
            time.sleep(0.1)
        seconds = time.time() - started
        rows = []
        for i, client in enumerate(clients):
            used = redis_cpu(client) - cpu[i]
            calls = total_commands(client) - commands[i]
            rows.append(
                {
                    "shards": count,
                    "shard": i,
                    "variants": ",".join(groups[i]),
                    "jobs": expected[i],
                    "seconds": seconds,
                    "redis_ms_per_job": used / expected[i] * 1000,
                    "commands_per_job": calls / expected[i],
                    "busy": used / seconds,
                }
            )
        for client in clients:
            client.close()
        return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--appendfsync", default="everysec", choices=["always", "everysec", "no"])
    args = parser.parse_args()
    results = []
    with MotoServer() as moto, tempfile.TemporaryDirectory(prefix="bench-shards-") as logs:
        for count in args.shards:
            results.append(simulate(count, args, moto.url, Path(logs)))
    print(
        f"### Redis shards: {cpu_model()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
        f"{args.jobs} jobs, 3 null-model workers x 2 job threads, appendfsync {args.appendfsync}\n"
    )
    print(
        "| shards | shard | variants | jobs | Redis CPU ms per job | Redis commands per job | Redis core "
        "busy "
        "| measured jobs/s (all shards) | Redis ceiling, jobs/s (all shards) |"
    )
    print("| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for rows in results:
        total_jobs = sum(r["jobs"] for r in rows)
        # The fleet's rate at which the busiest Redis core is full, with this mix of variants.
        ceiling = min(1000 / r["redis_ms_per_job"] / (r["jobs"] / total_jobs) for r in rows)
        for r in rows:
            print(
                f"| {r['shards']} | {r['shard']} | {r['variants']} | {r['jobs']} | "
                f"{r['redis_ms_per_job']:.2f} | "
                f"{r['commands_per_job']:.1f} | {r['busy'] * 100:.0f}% | {total_jobs / r['seconds']:.1f} | "
                f"{ceiling:.0f} |"
            )


if __name__ == "__main__":
    main()
