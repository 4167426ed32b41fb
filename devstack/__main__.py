"""`python -m devstack up|demo`: the local stack in the foreground, or the demo."""

from __future__ import annotations

import argparse
import re
import signal
import sys
import time

# The worker's log line for each variant it can serve (worker/app.py).
_VARIANT_READY = re.compile(r"variant (\S+) ready in ([\d.]+)s: (.*)")


def print_endpoints(stack) -> None:
    settings = stack.settings
    assert settings is not None and stack.tls is not None
    ca = stack.tls.ca
    print("local stack starting (Ctrl-C stops it)")
    print(f"  redis            {settings.redis_url}")
    print(
        f"  S3 + SQS         {settings.s3_endpoint_url}  (AWS_ACCESS_KEY_ID=testing "
        f"AWS_SECRET_ACCESS_KEY=testing)"
    )
    print(f"  input bucket     s3://{settings.input_bucket}/   (uploads here become jobs)")
    print(f"  output bucket    s3://{settings.output_bucket}/{settings.output_prefix}")
    print(f"  event queue      {settings.sqs_queue_url}")
    for name, variants in stack.workers.items():
        print(f"  {name:<16} {', '.join(variants)}")
    print(f"  gateway          {stack.gateway_url}  (fal-compatible; auth off, any FAL_KEY works; CA {ca})")
    print(f"  logs             {stack.log_dir}")
    if stack.dev.allow_loopback_urls:
        print(
            "  image URLs       may point at 127.0.0.1, any port (BIREFNET_DEV_ALLOW_LOOPBACK_URLS=false: "
            "production rules)"
        )
    else:
        print("  image URLs       production rules: public addresses, ports 80/443 only")
    if stack.hub_offline_reason:
        print(
            f"  Hugging Face     offline: {stack.hub_offline_reason}; workers use cached checkpoints, "
            f"else {stack.dev.weights_fallback} weights"
        )
    print("env for other shells:")
    for key in (
        "BIREFNET_REDIS_URL",
        "BIREFNET_S3_ENDPOINT_URL",
        "BIREFNET_SQS_ENDPOINT_URL",
        "BIREFNET_SQS_QUEUE_URL",
    ):
        print(f"  export {key}={stack.env[key]}")
    host = stack.gateway_url.removeprefix("https://")
    print("Python (fal_client) against the gateway:")
    print(f"  export FAL_KEY=dev FAL_RUN_HOST={host}/run FAL_QUEUE_RUN_HOST={host}/queue SSL_CERT_FILE={ca}")
    print("JavaScript (@fal-ai/client, Node 18+) against the gateway:")
    print(f"  export FAL_KEY=dev NODE_EXTRA_CA_CERTS={ca} GATEWAY_URL={stack.gateway_url}")
    print('  fal.config({ proxyUrl: { url: `${process.env.GATEWAY_URL}/api/fal/proxy`, when: "always" } });')
    print("curl:")
    print(f"  curl --cacert {ca} -H 'Authorization: Key dev' -H 'Content-Type: application/json' \\")
    print(f'       -d \'{{"image_url": "https://..."}}\' {stack.gateway_url}/queue/fal-ai/birefnet/v2')


class ReadinessReporter:
    """Prints each variant as its worker reports it loaded, and each worker once it is ready."""

    def __init__(self, stack, started: float):
        self.stack, self.started = stack, started
        self.seen_variants: set[tuple[str, str]] = set()
        self.ready_workers: set[str] = set()
        self.announced_all = False

    def poll(self) -> None:
        if self.announced_all:
            return  # nothing more to report (and the logs keep growing with every job)
        for name, variants in self.stack.workers.items():
            path = self.stack.log_dir / f"{name}.log"
            text = path.read_text(errors="replace") if path.exists() else ""
            for variant, seconds, what in _VARIANT_READY.findall(text):
                if (name, variant) not in self.seen_variants:
                    self.seen_variants.add((name, variant))
                    note = "UNTRAINED recipe weights" if what.startswith("UNTRAINED") else what
                    print(
                        f"[{self.elapsed():6.1f}s] {name}: variant {variant} loaded in {float(seconds):.1f}s "
                        f"({note})",
                        flush=True,
                    )
            if name not in self.ready_workers and self.stack.ready_file(name).exists():
                self.ready_workers.add(name)
                print(f"[{self.elapsed():6.1f}s] {name} READY: serves {', '.join(variants)}", flush=True)
        if not self.announced_all and self.ready_workers == set(self.stack.workers):
            self.announced_all = True
            models = sum(len(v) for v in self.stack.workers.values())
            print(
                f"[{self.elapsed():6.1f}s] all workers ready: {models} variant(s) served; send requests now",
                flush=True,
            )

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


def up() -> None:
    from devstack.stack import LocalStack

    started = time.perf_counter()
    stack = LocalStack().start()
    print_endpoints(stack)
    print("loading models (each worker says when it is ready) ...", flush=True)
    reporter = ReadinessReporter(stack, started)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while all(p.poll() is None for p in stack.processes.values()):
            reporter.poll()
            time.sleep(0.5)
        exited = [name for name, p in stack.processes.items() if p.poll() is not None]
        print(
            f"{', '.join(exited)} exited; stopping. Last lines of its log:\n{stack.tail(exited[0])}",
            file=sys.stderr,
        )
    except KeyboardInterrupt:
        pass
    finally:
        stack.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m devstack")
    parser.add_argument("command", choices=["up", "demo"])
    args = parser.parse_args(argv)
    if args.command == "up":
        up()
    else:
        from devstack.demo import run_demo

        try:
            run_demo()
        except KeyboardInterrupt:
            print("interrupted; everything started was stopped", file=sys.stderr)
            sys.exit(130)


if __name__ == "__main__":
    main()
