"""`python -m worker --variants general-light[,portrait]`: load models warm, then consume their queues."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from worker.runner import JobRunner


def main(argv: list[str] | None = None, on_loaded: Callable[[JobRunner], None] | None = None) -> None:
    """`on_loaded(runner)`: called once the models are loaded, before any job is taken."""
    parser = argparse.ArgumentParser(prog="python -m worker")
    parser.add_argument("--variants", help="comma-separated variant ids (default: BIREFNET_WORKER_VARIANTS)")
    parser.add_argument("--loglevel", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.loglevel, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from common.observability.redact import install_log_redaction

    install_log_redaction()  # no credential in any log line

    from common.settings import WorkerSettings, check_secrets
    from worker.app import WorkerProcess, create_celery_app
    from worker.run_overrides import RunOverrides

    # --variants overrides BIREFNET_WORKER_VARIANTS; every other setting comes from the environment.
    settings = WorkerSettings(worker_variants=args.variants) if args.variants else WorkerSettings()
    check_secrets(settings)  # refuses development secrets outside development
    limits_redis = None
    if settings.redis_shards:  # the worker's variants live on one Redis shard: its jobs are all there
        from common.state.shards import ShardMap, settings_for

        limits_redis = settings  # per-key limits (a video's charge) stay on shard 0, redis_url
        settings = settings_for(
            settings, ShardMap.from_settings(settings).for_variants(list(settings.worker_variants))
        )
    # Before any model loads: a driver too old for this torch build's CUDA is a clear exit, not a
    # crash loop on "CUDA is not available".
    from worker.cuda_driver import DriverTooOld, require_driver

    try:
        require_driver(settings.device)
    except DriverTooOld as error:
        logging.getLogger("worker").critical("%s", error)
        parser.exit(3, f"python -m worker: {error}\n")
    if settings.benchmark_null_model:
        from worker.null_model import mark_process_logs

        mark_process_logs()

    state = WorkerProcess(settings, RunOverrides(), on_loaded=on_loaded, limits_redis=limits_redis)
    app = create_celery_app(settings, state)
    state.load(app)
    queues = ",".join(settings.variants.get(v).queue for v in settings.worker_variants)
    # One job at a time runs in the main thread (solo); more run in threads that share the warm model.
    pool = (
        ["--pool=solo"]
        if settings.worker_concurrency == 1
        else ["--pool=threads", f"--concurrency={settings.worker_concurrency}"]
    )
    app.worker_main(
        [
            "worker",
            *pool,
            "-Q",
            queues,
            "-n",
            f"{'+'.join(settings.worker_variants)}@%h",
            f"--loglevel={args.loglevel}",
            "--without-gossip",
            "--without-mingle",
        ]
    )


if __name__ == "__main__":
    main()
