"""`make demo`: upload sample photos to a private local stack and bring the cut-outs back to ./out/."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import httpx
from PIL import Image
from rich.console import Console
from rich.panel import Panel
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from skimage import data as samples

from common.state import keys
from common.state.jobs import JobStore
from devstack.receiver import WebhookReceiver
from devstack.services import aws_client
from devstack.stack import DevStackSettings, LocalStack

console = Console(width=None if Console().is_terminal else 120)


def _weights_banner(store: JobStore) -> None:
    workers = [json.loads(store.redis.get(k) or "{}") for k in store.redis.keys(keys.HEARTBEAT_PATTERN)]
    untrained = sorted({v for w in workers for v in w.get("untrained", [])})
    if untrained:
        console.print(
            Panel(
                "[bold]The trained checkpoint could not be loaded here, so the worker runs with UNTRAINED "
                "recipe "
                "weights (random numbers made from the state-dict keys). The pipeline is real; the masks are "
                "not. "
                "Put a checkpoint in the weights cache or set BIREFNET_VARIANT_OVERRIDES to serve a trained "
                f"model.[/bold]\n\nvariants on untrained weights: {', '.join(untrained)}",
                title="[blink]UNTRAINED WEIGHTS[/blink]",
                border_style="bold red",
            )
        )


def run_demo(out_dir: Path = Path("out")) -> None:
    started = time.perf_counter()
    stack = LocalStack(DevStackSettings(allow_loopback_urls=True))  # its webhook receiver is on loopback
    receiver = WebhookReceiver().start()
    try:
        console.print(f"starting a private stack (logs in {stack.log_dir}) ...")
        stack.start(variants=stack.dev.demo_variant)
        assert stack.settings is not None
        settings = stack.settings
        with console.status("loading the model into the worker (warm start) ..."):
            stack.wait_worker_ready()
        store = JobStore.from_settings(settings)
        _weights_banner(store)

        s3 = aws_client("s3", settings.s3_endpoint_url, settings, stack.env)
        variant = stack.dev.demo_variant
        photos = {"astronaut": samples.astronaut(), "chelsea": samples.chelsea(), "coffee": samples.coffee()}
        uploaded_at: dict[str, float] = {}
        for name, pixels in photos.items():
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="JPEG", quality=92)
            uploaded_at[name] = time.time()
            s3.put_object(
                Bucket=settings.input_bucket,
                Key=f"demo/{name}.jpg",
                Body=buffer.getvalue(),
                ContentType="image/jpeg",
                Metadata={"model": variant, "output_mask": "true", "webhook_url": receiver.url},
            )
        console.print(f"uploaded {len(photos)} photos to s3://{settings.input_bucket}/demo/")

        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            console=console,
        ) as progress:
            task = progress.add_task("waiting for results", total=len(photos))
            deadline = time.time() + 150
            while len(receiver.received) < len(photos):
                if time.time() > deadline:
                    raise TimeoutError(f"no results after 150 s; worker log:\n{stack.tail('worker')}")
                if stack.processes["worker"].poll() is not None:
                    raise RuntimeError(f"the worker exited:\n{stack.tail('worker')}")
                progress.update(task, completed=len(receiver.received))
                time.sleep(0.1)
            progress.update(task, completed=len(photos))

        out_dir.mkdir(exist_ok=True)
        table = Table(title=f"cut-outs in ./{out_dir}/")
        for column in (
            "image",
            "size",
            "variant",
            "waited",
            "fetch",
            "decode",
            "inference",
            "render",
            "upload",
            "total",
        ):
            table.add_column(
                column, justify="left" if column in ("image", "variant") else "right", no_wrap=True
            )
        for delivery in receiver.received:
            body = delivery.json()
            record = store.get(body["request_id"])
            assert record is not None
            name = Path(record.spec.image_url).stem
            if body["status"] != "OK":
                table.add_row(name, f"ERROR: {body['error']}", record.spec.variant, *["-"] * 7)
                continue
            for field, suffix in (("image", ""), ("mask_image", ".mask")):
                item = body["payload"][field]
                (out_dir / f"{name}{suffix}.png").write_bytes(httpx.get(item["url"]).content)
            cutout = Image.open(out_dir / f"{name}.png")
            assert cutout.size == photos[name].shape[1::-1] and cutout.mode == "RGBA"
            timings = record.extra.get("timings", {})
            queued = (record.started_at or 0) - record.created_at
            cells = [
                f"{timings.get(k, 0):.2f}s"
                for k in ("fetch", "decode", "inference", "render", "upload", "total")
            ]
            table.add_row(
                f"{name}.png",
                f"{cutout.width}x{cutout.height}",
                record.spec.variant,
                f"{queued:.2f}s",
                *cells,
            )
        console.print(table)
        _weights_banner(store)
        console.print(f"demo finished in {time.perf_counter() - started:.1f}s")
    finally:
        receiver.stop()
        stack.stop()
