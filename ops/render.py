"""Rich rendering of the dicts `ops.status` and `ops.control` return."""

from __future__ import annotations

from datetime import UTC, datetime

from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from common.observability.redact import redact_text


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


def clock(timestamp: float | None) -> str:
    if not timestamp:
        return "-"
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _short(text: str | None, width: int = 60) -> str:
    text = redact_text(text or "-")  # URLs and errors as stored may carry signatures or passwords
    return text if len(text) <= width else text[: width - 1] + "…"


def _table(title: str, columns: tuple[str, ...]) -> Table:
    table = Table(title=title, title_justify="left")
    for name in columns:
        table.add_column(name)
    return table


def status_view(data: dict) -> Group:
    parts: list = []
    if data["untrained_variants"]:
        parts.append(
            Panel.fit(
                Text(
                    f"variants on UNTRAINED recipe weights: {', '.join(data['untrained_variants'])}\n"
                    "their masks are meaningless: put trained checkpoints in place before real work",
                    style="bold",
                ),
                title="UNTRAINED WEIGHTS",
                border_style="bold red",
            )
        )

    if data.get("unserved_variants"):
        lines = [
            f"no worker serves {u['model']} ({u['variant']}) right now: {u['waiting_jobs']} job(s) waiting, "
            f"oldest {duration(u['oldest_waiting_seconds'])}"
            for u in data["unserved_variants"]
        ]
        parts.append(
            Panel.fit(
                Text(
                    "\n".join(lines) + "\nstart a worker for it (python -m worker --variants ID) "
                    "or check the autoscaler",
                    style="bold",
                ),
                title="NO WORKER",
                border_style="bold red",
            )
        )
    window = duration(data["window_seconds"])
    table = Table(
        title=f"queues at {clock(data['at'])} (throughput and latency: last {window})", title_justify="left"
    )
    for name, justify in (
        ("variant", "left"),
        ("state", "left"),
        ("queued", "right"),
        ("oldest", "right"),
        ("running", "right"),
        ("workers", "right"),
        ("done/failed", "right"),
        ("jobs/min", "right"),
        ("p50", "right"),
        ("p95", "right"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for variant, v in data["variants"].items():
        state = Text("PAUSED", style="bold yellow") if v["paused"] else Text("active", style="green")
        starving = not v["workers"] and (v["waiting_jobs"] or v["queued_messages"])  # nobody will take them
        workers = Text(str(len(v["workers"])), style="bold red" if v["untrained_workers"] or starving else "")
        if v["untrained_workers"]:
            workers.append(" untrained", style="bold red")
        queued = str(v["queued_messages"])
        if v["waiting_jobs"] != v["queued_messages"]:
            queued += f" ({v['waiting_jobs']} jobs)"
        running = str(v["in_progress"])
        table.add_row(
            variant,
            state,
            queued,
            duration(v["oldest_waiting_seconds"]),
            running,
            workers,
            Text.assemble(str(v["done"]), "/", (str(v["failed"]), "bold red" if v["failed"] else "")),
            f"{v['jobs_per_minute']:.1f}",
            duration(v["latency_p50"]),
            duration(v["latency_p95"]),
        )
    parts.append(table)
    if not data["variants"]:
        parts.append(Text("no queued jobs, workers or recent completions (--all lists every variant)"))
    parts.append(
        Text(
            "p50/p95: job created -> result stored (done jobs); --json adds run time and queue wait",
            style="dim",
        )
    )

    workers_table = _table("workers online", ("worker", "variants", "device", "weights", "seen", "up"))
    for w in data["workers"]:
        weights = (
            Text(f"UNTRAINED: {', '.join(w['untrained'])}", style="bold red")
            if w["untrained"]
            else Text("trained", style="green")
        )
        workers_table.add_row(
            w["name"],
            ", ".join(w["variants"]),
            w["device"],
            weights,
            f"{w['seen_seconds_ago']:.0f}s ago",
            duration(w["up_seconds"]),
        )
    if not data["workers"]:
        workers_table.add_row(
            Text("no worker heartbeat in the last 30 s", style="bold red"), "", "", "", "", ""
        )
    parts.append(workers_table)

    checks = [
        (w["name"], variant, report)
        for w in data["workers"]
        for variant, report in (w.get("patch_order") or {}).items()
        if report
    ]
    if checks:
        order_table = _table(
            "patch order (worker self-check at load; mask confidence 0..0.5)",
            ("worker", "variant", "configured", "in use", "einops", "legacy", "verdict"),
        )
        styles = {"adopted": "bold red", "pinned": "bold red", "inconclusive": "yellow", "confirmed": "green"}
        for worker_name, variant, report in checks:
            confidence = report.get("confidence") or {}
            order_table.add_row(
                worker_name,
                variant,
                report["configured"],
                report["in_use"],
                f"{confidence['einops']:.4f}" if "einops" in confidence else "-",
                f"{confidence['legacy']:.4f}" if "legacy" in confidence else "-",
                Text(report["verdict"], style=styles.get(report["verdict"], "dim")),
            )
        parts.append(order_table)

    hooks = data["webhooks"]
    line = Text("webhooks: ")
    line.append(
        f"{hooks['failed']} failed after every retry", style="bold red" if hooks["failed"] else "green"
    )
    line.append(f", {hooks['retrying']} retrying", style="yellow" if hooks["retrying"] else "")
    parts.append(line)
    if hooks["recent_failures"]:
        failed = _table("latest webhook failures", ("request", "failed at", "attempts", "last error", "url"))
        for f in hooks["recent_failures"]:
            failed.add_row(
                f["request_id"],
                clock(f["failed_at"]),
                str(f["attempts"]),
                _short(f["last_error"], 40),
                _short(f["webhook_url"], 40),
            )
        parts.append(failed)

    dead = data["deadletters"]
    parts.append(Text(f"dead letters: {dead['count']}", style="bold red" if dead["count"] else "green"))
    if dead["entries"]:
        parts.append(deadletters_view(dead, title="latest dead letters"))
    return Group(*parts)


def deadletters_view(data: dict, title: str | None = None) -> Table:
    table = _table(
        title or f"dead letters ({data['count']})",
        ("request", "variant", "dead since", "attempts", "last error", "input"),
    )
    for e in data["entries"]:
        table.add_row(
            e["request_id"],
            e["variant"] or "-",
            clock(e["dead_at"]),
            str(e["attempts"]),
            _short(e["last_error"] or e["error"], 50),
            _short(e["image_url"], 50),
        )
    if not data["entries"]:
        table.add_row("(none)", "", "", "", "", "")
    return table


def control_view(command: str, data: dict) -> Text:
    variant = data.get("variant", "")
    if command == "pause":
        return Text.assemble(
            (f"{variant} paused", "bold yellow"),
            f": queue {data['queue']}; {data['workers_serving']} worker(s) serve it, "
            f"{len(data['acknowledged_by'])} acknowledged at once (a busy worker stops after "
            "its current job)",
        )
    if command == "resume":
        note = "" if data["was_paused"] else " (it was not paused)"
        return Text.assemble(
            (f"{variant} resumed", "bold green"),
            f"{note}: {data['workers_serving']} worker(s) told to consume {data['queue']} again",
        )
    if command == "drain":
        if data["drained"]:
            head = (f"{variant} drained in {duration(data['waited_seconds'])}", "bold green")
        else:
            head = (f"{variant} NOT drained after {duration(data['waited_seconds'])}", "bold red")
        return Text.assemble(
            head,
            f": {len(data['finished'])} job(s) finished meanwhile, "
            f"{len(data['running'])} still running, {data['left_in_queue']} left in the queue; "
            f"{data['workers_stopped']}/{data['workers_serving']} worker(s) confirmed; the variant "
            "stays paused (python -m ops resume " + variant + ")",
        )
    if command == "requeue":
        return Text.assemble(
            (f"{data['request_id']} requeued", "bold green"),
            f" on {data['queue']} (attempts reset; was: {_short(data['previous_error'], 80)})",
        )
    return Text(str(data))
