"""`python -m producer sqs|http`: the S3-event consumer (SQS or HTTP)."""

from __future__ import annotations

import argparse
import logging
import signal
import threading

from common.settings import ProducerSettings, check_secrets


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m producer")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("sqs", help="consume S3 event notifications from SQS")
    http = sub.add_parser(
        "http", help="take S3 event notifications over HTTP (MinIO webhooks): POST /s3-events"
    )
    http.add_argument("--host", help="bind address (default: BIREFNET_PRODUCER_HTTP_HOST)")
    http.add_argument("--port", type=int, help="port (default: BIREFNET_PRODUCER_HTTP_PORT)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from common.observability.redact import install_log_redaction

    install_log_redaction()  # no credential in any log line
    settings = ProducerSettings()
    check_secrets(settings)  # refuses development secrets outside development

    if args.command == "sqs":
        from common.adapters.storage import make_sqs_client
        from common.observability.metrics import (
            process_probes,
            register_queue_collector,
            start_metrics_server,
        )
        from producer.intake import CountingIntake, build_intake
        from producer.sqs import SqsConsumer

        if not settings.sqs_queue_url:
            parser.error("BIREFNET_SQS_QUEUE_URL is not set")
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        register_queue_collector(settings)
        start_metrics_server(
            settings.producer_metrics_port, "producer", process_probes(settings), host=settings.metrics_host
        )
        built = build_intake(settings)
        intake = CountingIntake(built, "sqs")
        SqsConsumer(
            make_sqs_client(settings),
            settings.sqs_queue_url,
            intake,
            wait_seconds=settings.sqs_wait_seconds,
            has_room=built.limiter.queue_has_room,
        ).run(stop)
    elif args.command == "http":
        from producer.http_receiver import serve

        serve(settings, args.host, args.port)


if __name__ == "__main__":
    main()
