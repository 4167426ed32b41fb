"""`python -m deliverer [--concurrency N]`: the webhook delivery worker (Celery queue 'webhooks')."""

from __future__ import annotations

import argparse
import logging

from common.settings import DelivererSettings, check_secrets


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m deliverer")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--shard", type=int, default=0, help="the Redis shard whose webhooks it delivers "
                        "(redis_shards; 0: redis_url); one deliverer deployment per shard")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from common.observability.redact import install_log_redaction

    install_log_redaction()  # no credential in any log line
    settings = DelivererSettings()
    check_secrets(settings)  # refuses development secrets outside development
    if args.shard:
        from common.state.shards import ShardMap, settings_for

        settings = settings_for(settings, ShardMap.from_settings(settings).shards[args.shard])

    from common.adapters.queue import WEBHOOK_QUEUE
    from common.observability.metrics import (
        instrument_webhook_deliverer,
        process_probes,
        start_metrics_server,
    )
    from common.state.jobs import JobStore
    from deliverer.app import create_celery_app

    store = JobStore.from_settings(settings)
    app = create_celery_app(settings, store)
    instrument_webhook_deliverer(store, settings.webhook_max_retries)
    start_metrics_server(settings.webhooks_metrics_port, "webhooks", process_probes(settings),
                         host=settings.metrics_host)
    app.worker_main(["worker", "-Q", WEBHOOK_QUEUE, "--pool=threads", f"--concurrency={args.concurrency}",
                     "-n", "webhooks@%h", "--loglevel=INFO", "--without-gossip", "--without-mingle"])


if __name__ == "__main__":
    main()
