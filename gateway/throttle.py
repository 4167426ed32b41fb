"""Failed-authentication throttling per client, counted in Redis (shared by every gateway process): past
`gateway_auth_fail_limit` failures in a window, credentials from that client go unchecked until it ends (429).

A client is the caller's address (an IPv6 caller's /64, which one host usually holds whole). Only the
client's own failures count against it: guesses at a key id from elsewhere never lock its owner out, and
the answer is the same for configured and unknown key ids, so throttling tells nobody which ids exist.
Credentials this process verified before still pass."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import redis.asyncio as aioredis
from fastapi import Request

from common.settings import GatewaySettings
from common.state import keys
from gateway.responses import FalError
from gateway.urls import forwarded_trusted, trusted_proxy


def client_address(request: Request, settings: GatewaySettings) -> str:
    """The caller's address: the socket's peer, or, when that peer is a trusted proxy, the nearest
    X-Forwarded-For hop that is not one (what the outermost trusted proxy saw)."""
    peer = request.client.host if request.client else "unknown"
    if not forwarded_trusted(settings, peer):
        return peer
    hops = [hop.strip() for hop in request.headers.get("x-forwarded-for", "").split(",") if hop.strip()]
    for hop in reversed(hops):
        if not trusted_proxy(settings, hop):
            return hop[:64]
    return hops[0][:64] if hops else peer


def client_scope(address: str) -> str:
    """What failures are counted under: the address, an IPv6 address's /64."""
    try:
        parsed = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(parsed, ipaddress.IPv6Address):
        if parsed.ipv4_mapped is not None:
            return str(parsed.ipv4_mapped)
        return str(ipaddress.ip_network(f"{parsed}/64", strict=False))
    return str(parsed)


@dataclass(frozen=True)
class AuthThrottle:
    redis: aioredis.Redis
    limit: int
    window: int

    @staticmethod
    def scopes(address: str) -> list[str]:
        return [keys.auth_fail_address(client_scope(address))]

    async def check(self, scopes: list[str]) -> None:
        if not self.limit:
            return
        counts = await self.redis.mget(scopes)
        over = [
            scope for scope, count in zip(scopes, counts, strict=True) if count and int(count) >= self.limit
        ]
        if over:
            retry = max([await self.redis.ttl(scope) for scope in over] + [1])
            raise FalError.flat(
                429,
                f"Too many failed authentication attempts; retry in {retry} s",
                "rate_limited",
                headers={"Retry-After": str(retry)},
            )

    async def failed(self, scopes: list[str]) -> None:
        if not self.limit:
            return
        pipe = self.redis.pipeline(transaction=True)
        for scope in scopes:
            pipe.set(scope, 0, ex=self.window, nx=True)
            pipe.incr(scope)
        await pipe.execute()
