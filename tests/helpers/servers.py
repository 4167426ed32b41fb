"""Servers on loopback for the tests: an ASGI app in a thread, and the SSRF tests' counting HTTP(S) server."""

from __future__ import annotations

import contextlib
import gzip
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import uvicorn

from devstack.services import free_port
from tests.helpers.images import tiny_png
from tests.helpers.stack import wait_for

PNG = tiny_png()


@contextmanager
def serve(app) -> Iterator[str]:
    """Run an ASGI app with uvicorn in a thread; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 15, "uvicorn to start")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


class LocalServer:
    """HTTP(S) server on a loopback address that counts connections and records requests.
    Paths: /img.png, /redirect?to=URL, /loop, /chain/N, /huge-declared, /stream, /drip, /gzip-bomb,
    /empty, /truncated, /status/N, and any path put into `files` as (body, content type)."""

    def __init__(self, host: str = "127.0.0.1", tls: ssl.SSLContext | None = None):
        self.connections = 0
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.files: dict[str, tuple[bytes, str]] = {"/img.png": (PNG, "image/png")}
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                owner.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
                with contextlib.suppress(BrokenPipeError, ConnectionResetError, ssl.SSLError):
                    owner.route(self)

            def log_message(self, *args) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def verify_request(self, request, client_address) -> bool:
                owner.connections += 1
                return True

            def handle_error(self, request, client_address) -> None:
                pass  # failed TLS handshakes are part of the tests

        self.httpd = Server((host, 0), Handler)
        self.httpd.owner = self  # type: ignore[attr-defined]
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(
                self.httpd.socket, server_side=True, do_handshake_on_connect=False
            )
        self.host, self.port = host, self.httpd.server_address[1]
        self.scheme = "https" if tls else "http"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> LocalServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def url(self, path: str = "/img.png", host: str | None = None) -> str:
        return f"{self.scheme}://{host or self.host}:{self.port}{path}"

    @staticmethod
    def route(h: BaseHTTPRequestHandler) -> None:
        owner: LocalServer = h.server.owner  # type: ignore[attr-defined]
        parts = urlsplit(h.path)
        path = parts.path

        def send(status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
            h.send_response(status)
            for key, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
                h.send_header(key, value)
            h.end_headers()
            h.wfile.write(body)

        if path in owner.files:
            body, ctype = owner.files[path]
            send(200, body, {"Content-Type": ctype})
        elif path == "/redirect":
            send(302, headers={"Location": parse_qs(parts.query)["to"][0]})
        elif path == "/loop":
            send(302, headers={"Location": "/loop"})
        elif path.startswith("/chain/"):
            left = int(path.rsplit("/", 1)[1])
            send(302, headers={"Location": f"/chain/{left - 1}" if left else "/img.png"})
        elif path.startswith("/status/"):
            send(int(path.rsplit("/", 1)[1]), b"nope")
        elif path == "/empty":
            send(200, b"", {"Content-Type": "image/png"})
        elif path == "/huge-declared":  # claims 1 GB, then stalls: we must not wait for it
            h.send_response(200)
            h.send_header("Content-Length", str(10**9))
            h.end_headers()
            h.wfile.flush()
            time.sleep(5)
        elif path == "/stream":  # no Content-Length, never-ending (20 MB) body
            h.send_response(200)
            h.end_headers()
            for _ in range(320):
                h.wfile.write(b"\0" * 65536)
        elif path == "/drip":  # a byte every 0.1 s: only the total deadline stops it
            h.send_response(200)
            h.send_header("Content-Length", "1000")
            h.end_headers()
            for _ in range(1000):
                h.wfile.write(b"x")
                h.wfile.flush()
                time.sleep(0.1)
        elif path == "/gzip-bomb":  # 50 MB of zeros in ~50 KB, sent although we asked for identity
            body = gzip.compress(b"\0" * 50_000_000, compresslevel=9)
            send(200, body, {"Content-Encoding": "gzip", "Content-Type": "image/png"})
        elif path == "/truncated":  # promises 1000 bytes, sends 10 and hangs up
            h.send_response(200)
            h.send_header("Content-Length", "1000")
            h.end_headers()
            h.wfile.write(PNG[:10])
        else:
            send(404, b"not found")


class FileServer:
    """Serves fixed bodies by path on 127.0.0.1 (http image_url inputs); unknown paths are 404.
    `delays` holds a job in its download ("loading image") for that many seconds."""

    def __init__(self, files: dict[str, tuple[bytes, str]], delays: dict[str, float] | None = None):
        server_files, server_delays = files, delays or {}

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                time.sleep(server_delays.get(self.path, 0))
                body, mime = server_files.get(self.path, (b"missing", "text/plain"))
                self.send_response(200 if self.path in server_files else 404)
                self.send_header("content-type", mime)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
