"""A real HTTP server on 127.0.0.1 that records every POST it gets (webhook receiver for demos and tests)."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)


class WebhookReceiver:
    """Records POSTs; `status_codes` scripts its answers (default 200)."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.status_codes: list[int] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length)
                with receiver._lock:
                    receiver.received.append(Received(self.path, dict(self.headers.items()), body))
                    code = receiver.status_codes.pop(0) if receiver.status_codes else 200
                self.send_response(code)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def start(self) -> WebhookReceiver:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def wait(self, count: int = 1, timeout: float = 120) -> list[Received]:
        deadline = time.time() + timeout
        while len(self.received) < count:
            if time.time() > deadline:
                raise AssertionError(
                    f"timed out after {timeout}s waiting for {count} webhook deliveries "
                    f"(got {len(self.received)})"
                )
            time.sleep(0.05)
        return list(self.received)
