"""`python -m devstack up|demo`: the local stack in the foreground, or the demo."""

from __future__ import annotations

import argparse
import signal
import sys
import time


def up() -> None:
    from devstack.stack import LocalStack

    stack = LocalStack().start()
    settings = stack.settings
    assert settings is not None
    print("local stack running (Ctrl-C stops it)")
    print(f"  redis            {settings.redis_url}")
    print(f"  S3 + SQS         {settings.s3_endpoint_url}  (AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing)")
    print(f"  input bucket     s3://{settings.input_bucket}/   (uploads here become jobs)")
    print(f"  output bucket    s3://{settings.output_bucket}/{settings.output_prefix}")
    print(f"  event queue      {settings.sqs_queue_url}")
    print(f"  worker variants  {stack.dev.worker_variants}")
    print(f"  gateway          {stack.gateway_url}  (fal-compatible; auth off, any FAL_KEY works; CA {stack.tls.ca})")
    print(f"  logs             {stack.log_dir}")
    print("env for other shells:")
    for key in ("BIREFNET_REDIS_URL", "BIREFNET_S3_ENDPOINT_URL", "BIREFNET_SQS_ENDPOINT_URL",
                "BIREFNET_SQS_QUEUE_URL"):
        print(f"  export {key}={stack.env[key]}")
    host = stack.gateway_url.removeprefix("https://")
    print("fal_client against the gateway:")
    print(f"  export FAL_KEY=dev FAL_RUN_HOST={host}/run FAL_QUEUE_RUN_HOST={host}/queue SSL_CERT_FILE={stack.tls.ca}")
    print(f"  curl --cacert {stack.tls.ca} -H 'Authorization: Key dev' -H 'Content-Type: application/json' \\")
    print(f"       -d '{{\"image_url\": \"https://...\"}}' {stack.gateway_url}/queue/fal-ai/birefnet/v2")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while all(p.poll() is None for p in stack.processes.values()):
            time.sleep(0.5)
        print("a process exited; stopping", file=sys.stderr)
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
