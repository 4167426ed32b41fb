"""Command line of `python -m ops`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

import redis
from rich.console import Console, Group
from rich.markup import escape

from common.adapters.queue import make_celery
from common.adapters.redis_conn import redis_client
from common.domain.auth import new_key
from common.observability.redact import install_log_redaction, redact_text, redact_url
from common.settings import OpsSettings
from common.state.shards import ShardMap, settings_for
from ops import control, render
from ops.status import deadletters, gather_status


def _parser() -> argparse.ArgumentParser:
    # --json / --redis-url work before or after the subcommand.
    shared = argparse.ArgumentParser(add_help=False)
    shared.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print the data as JSON (for scripts)"
    )
    shared.add_argument(
        "--redis-url", default=argparse.SUPPRESS, help="Redis of the deployment (default: BIREFNET_REDIS_URL)"
    )
    shared.add_argument(
        "--shard",
        type=int,
        default=argparse.SUPPRESS,
        help="Redis shard to look at (BIREFNET_REDIS_SHARDS; default: the shard of the variant "
        "or request ids given, else 0)",
    )
    parser = argparse.ArgumentParser(
        prog="python -m ops",
        parents=[shared],
        description="Queues, workers and dead letters of birefnet-serve.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    status = sub.add_parser(
        "status", parents=[shared], help="per-variant queues, workers, throughput, latency"
    )
    status.add_argument(
        "--minutes", type=float, help="window of throughput/latency (default: BIREFNET_OPS_WINDOW_SECONDS)"
    )
    status.add_argument("--all", action="store_true", help="list every variant, idle ones included")
    pause = sub.add_parser("pause", parents=[shared], help="stop the workers of a variant taking new jobs")
    pause.add_argument("variant")
    pause.add_argument("--reason", default="", help="shown to whoever looks at the flag")
    resume = sub.add_parser("resume", parents=[shared], help="let the workers of a variant take jobs again")
    resume.add_argument("variant")
    drain = sub.add_parser("drain", parents=[shared], help="pause a variant and wait for its running jobs")
    drain.add_argument("variant")
    drain.add_argument("--timeout", type=float, default=600, help="seconds to wait (default 600)")
    dead = sub.add_parser("deadletters", parents=[shared], help="jobs that failed every attempt")
    dead.add_argument("--limit", type=int, default=50)
    requeue = sub.add_parser("requeue", parents=[shared], help="run failed / dead-lettered jobs again")
    requeue.add_argument("request_ids", nargs="+", metavar="request-id")
    make_key = sub.add_parser(
        "new-key", help="print a new FAL_KEY and its BIREFNET_GATEWAY_API_KEYS entry (needs no Redis)"
    )
    make_key.add_argument("--id", required=True)
    make_key.add_argument("--user-id")
    make_key.add_argument("--admin", action="store_true")
    make_key.add_argument("--scheme", choices=["scrypt", "sha256"], default="scrypt")
    return parser


def _new_key(args: argparse.Namespace) -> int:
    fal_key, entry = new_key(args.id, user_id=args.user_id, admin=args.admin, scheme=args.scheme)
    print(f"FAL_KEY={fal_key}")
    print(json.dumps(entry))
    return 0


def _on_shard(settings: OpsSettings, args: argparse.Namespace) -> OpsSettings:
    """The settings of the Redis shard the command is about (common.state.shards routes)."""
    if not settings.redis_shards:
        return settings
    shards = ShardMap.from_settings(settings)
    if getattr(args, "shard", None) is not None:
        shard = shards.shards[args.shard]
    elif getattr(args, "variant", None):
        shard = shards.for_variant(args.variant)
    elif getattr(args, "request_ids", None):
        found = {shards.for_request(rid).index for rid in args.request_ids}
        if len(found) > 1:
            raise SystemExit(
                f"the request ids are on different Redis shards {sorted(found)}: one shard at a time"
            )
        shard = shards.shards[found.pop()]
    else:
        shard = shards.shards[0]
    return settings_for(settings, shard)


def main(argv: list[str] | None = None) -> int:
    install_log_redaction()  # redis-py and Celery log connection errors with their URLs
    args = _parser().parse_args(argv)
    if args.command == "new-key":
        return _new_key(args)
    as_json = getattr(args, "json", False)
    overrides = {"redis_url": args.redis_url} if getattr(args, "redis_url", None) else {}
    settings = _on_shard(OpsSettings(**overrides), args)
    r = redis_client(settings, socket_connect_timeout=5)
    console = Console()
    exit_code = 0

    def show(data: dict | list, view: Callable[[], object]) -> None:
        if as_json:
            print(json.dumps(data, indent=2, default=str))
        else:
            console.print(view())

    try:
        if args.command == "status":
            window = args.minutes * 60 if args.minutes else None
            data = gather_status(r, settings, window=window, show_all=args.all)
            show(data, lambda: render.status_view(data))
        elif args.command == "deadletters":
            data = deadletters(r, limit=args.limit)
            show(data, lambda: render.deadletters_view(data))
        else:
            celery = make_celery(settings, name="birefnet-ops")
            if args.command == "pause":
                data = control.pause(r, celery, settings, args.variant, reason=args.reason)
            elif args.command == "resume":
                data = control.resume(r, celery, settings, args.variant)
            elif args.command == "drain":
                with console.status(f"draining {args.variant} ...") as spinner:
                    data = control.drain(
                        r,
                        celery,
                        settings,
                        args.variant,
                        timeout=args.timeout,
                        progress=lambda s: spinner.update(
                            f"draining {args.variant}: {len(s['running'])} job(s) running, "
                            f"{s['workers_stopped']}/{s['workers_serving']} worker(s) stopped, "
                            f"{s['waited_seconds']:.0f}s"
                        ),
                    )
                exit_code = 0 if data["drained"] else 1
            else:
                results = [control.requeue(r, celery, settings, rid) for rid in args.request_ids]
                show(results, lambda: Group(*(render.control_view("requeue", item) for item in results)))
                return 0
            show(data, lambda: render.control_view(args.command, data))
    except control.OpsError as exc:
        if as_json:
            print(json.dumps({"error": str(exc)}))
        else:
            console.print(f"[bold red]error:[/] {exc}")
        return 2
    except redis.ConnectionError as exc:
        message = f"Redis unreachable at {redact_url(settings.redis_url)}: {redact_text(str(exc))}"
        if as_json:
            print(json.dumps({"error": message}))
        else:
            console.print(f"[bold red]{escape(message)}[/]")
        return 3
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
