"""`python -m deliverer [--concurrency N] [--shard N]`: the webhook deliverer (deliverer/app.py)."""

from __future__ import annotations

import argparse
import logging
import signal
import threading

from common.settings import DelivererSettings, check_secrets


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m deliverer")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument(
        "--shard",
        type=int,
        default=0,
        help="the Redis shard whose webhooks it delivers "
        "(redis_shards; 0: redis_url); one deliverer deployment per shard",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from common.observability.redact import install_log_redaction

    install_log_redaction()  # no credential in any log line
    settings = DelivererSettings()
    check_secrets(settings)  # refuses development secrets outside development
    if args.shard:
        from common.state.shards import ShardMap, settings_for

        settings = settings_for(settings, ShardMap.from_settings(settings).shards[args.shard])

    from common.observability.metrics import process_probes, start_metrics_server
    from common.state.dev_secrets import webhook_signer
    from common.state.jobs import JobStore
    from common.state.webhooks import OutcomeOutbox, WebhookSender
    from deliverer.app import Deliverer

    store = JobStore.from_settings(settings)
    signer = webhook_signer(settings.webhook_signing_keys, store.redis)
    sender = WebhookSender(settings, store, signer, OutcomeOutbox())  # outcomes go with the next pop
    start_metrics_server(
        settings.webhooks_metrics_port, "webhooks", process_probes(settings), host=settings.metrics_host
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    logging.getLogger(__name__).info(
        "delivering webhooks (shard %d, %d threads)", args.shard, args.concurrency
    )
    Deliverer(settings, store, sender, args.concurrency).run(stop)


if __name__ == "__main__":
    main()
