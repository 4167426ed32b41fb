"""`python -m worker --variants general-light[,portrait]`: load models warm, then consume their queues."""

from __future__ import annotations

import argparse
import logging
import os


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m worker")
    parser.add_argument("--variants", help="comma-separated variant ids (default: BIREFNET_WORKER_VARIANTS)")
    parser.add_argument("--loglevel", default="INFO")
    args = parser.parse_args(argv)
    if args.variants:
        os.environ["BIREFNET_WORKER_VARIANTS"] = args.variants
    logging.basicConfig(level=args.loglevel, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from worker.app import app, settings, state  # after the environment is final

    if settings.benchmark_null_model:
        from worker.null_model import mark_process_logs

        mark_process_logs()

    state.load()
    queues = ",".join(settings.variants.get(v).queue for v in settings.worker_variants)
    # One job at a time runs in the main thread (solo); more run in threads that share the warm model.
    pool = ["--pool=solo"] if settings.worker_concurrency == 1 else [
        "--pool=threads", f"--concurrency={settings.worker_concurrency}"]
    app.worker_main([
        "worker", *pool, "-Q", queues, "-n", f"{'+'.join(settings.worker_variants)}@%h",
        f"--loglevel={args.loglevel}", "--without-gossip", "--without-mingle",
    ])


if __name__ == "__main__":
    main()
