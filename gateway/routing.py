"""Maps every URL convention fal's clients use onto the canonical `/queue/...` and `/run/...` routes
(docs/api.md#routes), before routing: trailing slashes; root paths (`queue.` hosts and `.../requests/...` to
/queue, other app paths to /run); `/queue/{owner}/{alias}/{subpath}/requests/...` to `{owner}/{alias}`;
`/api/fal/proxy` with a fal `x-fal-target-url` (JS `proxyUrl`) to the route it names (else its 400)."""

from __future__ import annotations

import re
from collections.abc import Callable
from urllib.parse import unquote, urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

PROXY_PATH = "/api/fal/proxy"
PROXY_TARGETS = {"queue.fal.run": "/queue", "fal.run": "/run", "rest.fal.ai": "/rest"}
# First path segments that are the gateway's own, never an app id.
RESERVED = {
    "queue",
    "run",
    "rest",
    "api",
    ".well-known",
    "openapi.json",
    "docs",
    "redoc",
    "admin",
    "files",
    "objects",
    "healthz",
    "livez",
    "readyz",
    "metrics",
    "favicon.ico",
    "playground",
}
_SUBPATH_BEFORE_REQUESTS = re.compile(r"^/queue/([^/]+)/([^/]+)/(?:[^/]+/)+requests/")


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return ""


def canonical_path(path: str, host: str) -> str:
    if len(path) > 1 and path.endswith("/"):
        path = path.rstrip("/") or "/"
    first = path.lstrip("/").split("/", 1)[0]
    if first and first not in RESERVED:
        queue = host.lower().startswith("queue.") or "/requests/" in path
        path = ("/queue" if queue else "/run") + path
    return _SUBPATH_BEFORE_REQUESTS.sub(r"/queue/\1/\2/requests/", path)


def proxy_target(target_url: str) -> tuple[str, bytes] | None:
    """(gateway path, query) for an `x-fal-target-url`, or None when it is not a fal URL we serve."""
    try:
        parts = urlsplit(target_url)
    except ValueError:
        return None
    prefix = PROXY_TARGETS.get((parts.hostname or "").lower())
    if parts.scheme != "https" or prefix is None:
        return None
    return canonical_path(prefix + unquote(parts.path or "/"), ""), parts.query.encode()


class FalRouting:
    def __init__(self, app: ASGIApp, *, trust_forwarded: Callable[[str | None], bool]):
        self.app = app
        self.trust_forwarded = trust_forwarded  # peer address -> whether its X-Forwarded-* count

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope = dict(scope)
            path = scope["path"]
            target = _header(scope, b"x-fal-target-url") if path.rstrip("/") == PROXY_PATH else ""
            routed = proxy_target(target) if target and scope["method"] != "OPTIONS" else None
            if routed is not None:
                path, scope["query_string"] = routed
            else:
                peer = (scope.get("client") or (None,))[0]
                host = (self.trust_forwarded(peer) and _header(scope, b"x-forwarded-host")) or _header(
                    scope, b"host"
                )
                path = canonical_path(path, host.split(",")[0].strip())
            scope["path"] = path
            scope["raw_path"] = path.encode()
        await self.app(scope, receive, send)
