"""`python -m producer sqs|webhooks`: the S3-event consumer, or the webhook delivery worker."""

from __future__ import annotations

import argparse
import logging
import signal
import threading

from common.settings import Settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m producer")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("sqs", help="consume S3 event notifications from SQS")
    hooks = sub.add_parser("webhooks", help="run the webhook delivery worker (Celery queue 'webhooks')")
    hooks.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings()

    if args.command == "sqs":
        from common.storage import make_sqs_client
        from producer.app import build_intake
        from producer.sqs import SqsConsumer

        if not settings.sqs_queue_url:
            parser.error("BIREFNET_SQS_QUEUE_URL is not set")
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        SqsConsumer(make_sqs_client(settings), settings.sqs_queue_url, build_intake(settings),
                    wait_seconds=settings.sqs_wait_seconds).run(stop)
    elif args.command == "webhooks":
        from producer.webhook_worker import app

        app.worker_main(["worker", "-Q", "webhooks", "--pool=threads", f"--concurrency={args.concurrency}",
                         "-n", "webhooks@%h", "--loglevel=INFO", "--without-gossip", "--without-mingle"])


if __name__ == "__main__":
    main()
