"""Absolute URLs handed to callers: the Python client uses status/response/cancel URLs verbatim."""

from __future__ import annotations

import ipaddress

from fastapi import Request

from common.settings import GatewaySettings

APP_PATH = "fal-ai/birefnet"  # request-scoped URLs drop the `/v2` subpath (docs/api.md#routes)


def trusted_proxy(settings: GatewaySettings, address: str) -> bool:
    """Whether `address` is one of `gateway_trusted_proxies`."""
    try:
        parsed = ipaddress.ip_address(address.strip().split("%", 1)[0])
    except ValueError:
        return False
    return any(parsed in net for net in settings.trusted_proxy_networks)


def forwarded_trusted(settings: GatewaySettings, peer: str | None) -> bool:
    """Whether this connection's X-Forwarded-* headers are believed: forwarded headers are trusted, and the
    peer is a configured proxy (anyone else could send them)."""
    return settings.gateway_trust_forwarded and peer is not None and trusted_proxy(settings, peer)


def public_base(request: Request, settings: GatewaySettings) -> str:
    """`gateway_public_url`, else scheme://host of this request (X-Forwarded-* when trusted)."""
    if settings.gateway_public_url:
        return settings.gateway_public_url.rstrip("/")
    headers = request.headers
    proto = host = ""
    if forwarded_trusted(settings, request.client.host if request.client else None):
        proto = headers.get("x-forwarded-proto", "").split(",")[0].strip()
        host = headers.get("x-forwarded-host", "").split(",")[0].strip()
    return f"{proto or request.url.scheme}://{host or headers.get('host') or request.url.netloc}"


def request_urls(base: str, request_id: str) -> dict[str, str]:
    response_url = f"{base}/queue/{APP_PATH}/requests/{request_id}"
    return {
        "response_url": response_url,
        "status_url": f"{response_url}/status",
        "cancel_url": f"{response_url}/cancel",
    }
