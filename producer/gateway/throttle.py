"""Failed-authentication throttling per client address and per key id, counted in Redis (shared by every
gateway process): past `gateway_auth_fail_limit` failures in a window, credentials from that address or
naming that key id go unchecked until it ends (429). Credentials this process verified before still pass."""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio as aioredis
from fastapi import Request

from common.settings import Settings
from common.state import keys
from producer.gateway.responses import FalError


def client_address(request: Request, settings: Settings) -> str:
    """The caller's address: the last X-Forwarded-For hop when forwarded headers are trusted (what the
    nearest proxy saw), else the socket's peer."""
    if settings.gateway_trust_forwarded:
        hops = [hop.strip() for hop in request.headers.get("x-forwarded-for", "").split(",") if hop.strip()]
        if hops:
            return hops[-1][:64]
    return request.client.host if request.client else "unknown"


@dataclass(frozen=True)
class AuthThrottle:
    redis: aioredis.Redis
    limit: int
    window: int

    @staticmethod
    def scopes(address: str, key_id: str | None) -> list[str]:
        return [keys.auth_fail_address(address), *([keys.auth_fail_key(key_id)] if key_id else [])]

    async def check(self, scopes: list[str]) -> None:
        if not self.limit:
            return
        counts = await self.redis.mget(scopes)
        over = [scope for scope, count in zip(scopes, counts, strict=True) if count and int(count) >= self.limit]
        if over:
            retry = max([await self.redis.ttl(scope) for scope in over] + [1])
            raise FalError.flat(429, f"Too many failed authentication attempts; retry in {retry} s",
                                "rate_limited", headers={"Retry-After": str(retry)})

    async def failed(self, scopes: list[str]) -> None:
        if not self.limit:
            return
        pipe = self.redis.pipeline(transaction=True)
        for scope in scopes:
            pipe.set(scope, 0, ex=self.window, nx=True)
            pipe.incr(scope)
        await pipe.execute()
