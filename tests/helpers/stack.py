"""The tests' settings for a private stack, over devstack's one stack builder (devstack/builder.py).

A stack's environment lives in `Stack.env` and reaches its subprocesses only through it; the test process's
`os.environ` gets nothing of it (only moto's dummy AWS credentials, from conftest). The test process gets the
same values as `Stack.settings`. Feature stacks (the gateway stack in tests/helpers/gateway.py, the chaos
stack in tests/helpers/faults.py) are built with `build_stack` and add their own parts around it."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import redis

from devstack import builder
from devstack.builder import Stack, wait_for
from devstack.loopback import NANO_VARIANTS
from devstack.services import ROOT, settings_from

__all__ = [
    "ROOT",
    "TEST_VARIANTS",
    "Stack",
    "build_stack",
    "free_database",
    "isolated_settings",
    "settings_from",
    "wait_for",
]

# Tests run the nano architecture with recipe weights: fast on CPU, same code path as real checkpoints.
TEST_VARIANTS = NANO_VARIANTS


# The Redis databases test stacks take (redis-server's 16 but database 0), and per server the one last taken.
DATABASES = range(1, 16)
_last_database: dict[int, int] = {}


def free_database(redis_port: int) -> int:
    """A database of the test Redis no process is connected to, the first such after the one last taken (the
    least recently taken of all, should every one have clients). A module's stack lives on while each test's
    own stack comes and goes: two live stacks on one database would share their Celery queues (each one's
    workers taking the other's jobs, and storing their outputs in their own buckets), and the second one's
    FLUSHDB would wipe the first one's records."""
    client = redis.Redis(port=redis_port)
    try:
        busy = {int(entry["db"]) for entry in client.client_list()}
    finally:
        client.close()
    last = _last_database.get(redis_port, 0)
    order = [db for db in DATABASES if db > last] + [db for db in DATABASES if db <= last]
    db = next((db for db in order if db not in busy), order[0])
    _last_database[redis_port] = db
    return db


def isolated_settings(redis_port: int, log_dir: Path) -> tuple[str, str, dict[str, str]]:
    """A fresh Redis database (`free_database`), bucket names and fast timings for one test's processes:
    (name suffix, Redis URL, BIREFNET_* environment)."""
    suffix = uuid.uuid4().hex[:8]
    redis_url = f"redis://127.0.0.1:{redis_port}/{free_database(redis_port)}"
    redis.Redis.from_url(redis_url).flushdb()
    return (
        suffix,
        redis_url,
        {
            "BIREFNET_INPUT_BUCKET": f"in-{suffix}",
            "BIREFNET_OUTPUT_BUCKET": f"out-{suffix}",
            "BIREFNET_VARIANT_OVERRIDES": json.dumps(TEST_VARIANTS),
            "BIREFNET_WEIGHTS_FALLBACK": "none",
            "BIREFNET_JOB_LEASE_SECONDS": "6",
            "BIREFNET_SQS_WAIT_SECONDS": "1",
            "BIREFNET_TORCH_THREADS": "1",
            # Tests send the same few images again and again: without this, most would reuse a cached mask
            # and not
            # exercise the network path they are about (tests/e2e/test_beyond_fal.py turns the cache on).
            "BIREFNET_MASK_CACHE_SECONDS": "0",
            # Test servers (webhook receivers, image servers) listen on loopback; production refuses it.
            "BIREFNET_FETCH_ALLOW_NETWORKS": "127.0.0.1/32",
            "BIREFNET_FETCH_ALLOWED_PORTS": "*",
            # Tests may run several workers at once: no fixed metrics ports (tests that scrape set their own).
            "BIREFNET_WORKER_METRICS_PORT": "0",
            "BIREFNET_PRODUCER_METRICS_PORT": "0",
            "BIREFNET_WEBHOOKS_METRICS_PORT": "0",
            "BIREFNET_TEST_LOG_DIR": str(log_dir),
            # A test stack is a development stack: signing keys generated into its Redis are fine.
            "BIREFNET_ALLOW_DEV_SECRETS": "true",
        },
    )


# Workers of test stacks run the worker's own entry point with the testing-only hooks installed.
HOOKED_WORKER = "tests.helpers.hooked_worker"


def build_stack(
    redis_url: str, s3_url: str, values: dict[str, str], *, queue_name: str, sqs_url: str | None = None
) -> Stack:
    """devstack's `build_stack` over the test process's environment; logs go to `values`'
    BIREFNET_TEST_LOG_DIR. `sqs_url` (default: `s3_url`) lets S3 go through a proxy."""
    stack = builder.build_stack(
        redis_url,
        s3_url,
        values,
        log_dir=Path(values["BIREFNET_TEST_LOG_DIR"]),
        environ=os.environ,
        queue_name=queue_name,
        sqs_url=sqs_url,
    )
    stack.worker_module = HOOKED_WORKER
    return stack
