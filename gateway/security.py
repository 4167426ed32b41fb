"""FastAPI dependencies: who is calling (401 without a valid key), and admin-only routes (403)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import APIKeyHeader

from common.domain.auth import ANONYMOUS_PRINCIPAL, Principal, credential_from_header
from gateway.context import gateway
from gateway.responses import FalError
from gateway.throttle import AuthThrottle, client_address

# Declared for the OpenAPI document: fal's `Authorization: Key <id:secret>` (Bearer accepted too).
authorization_header = APIKeyHeader(
    name="Authorization",
    auto_error=False,
    description="`Key <key id>:<secret>` (fal's FAL_KEY), or `Bearer <same>`.",
)


async def principal(
    request: Request, header: Annotated[str | None, Depends(authorization_header)]
) -> Principal:
    gw = gateway(request)
    if gw.settings.gateway_auth == "off":
        return ANONYMOUS_PRINCIPAL
    credential = credential_from_header(header)
    found = gw.keys.cached(credential)
    if found is not None:
        return found
    if not header:
        raise FalError(401, {"detail": "Missing Authorization header", "error_type": "unauthorized"})
    # A presented credential is a guess until verified: throttled per client, whichever key id it names.
    settings = gw.settings
    throttle = AuthThrottle(gw.aredis, settings.gateway_auth_fail_limit, settings.gateway_auth_fail_window)
    scopes = throttle.scopes(client_address(request, settings))
    await throttle.check(scopes)
    # The first check of a scrypt-hashed key costs tens of ms: keep it off the event loop.
    found = await run_in_threadpool(gw.keys.authenticate, credential)
    if found is None:
        await throttle.failed(scopes)
        raise FalError(401, {"detail": "Invalid API key", "error_type": "unauthorized"})
    return found


async def admin(caller: Annotated[Principal, Depends(principal)]) -> Principal:
    if not caller.admin:
        raise FalError(403, {"detail": "This API key is not an admin key", "error_type": "forbidden"})
    return caller


Caller = Annotated[Principal, Depends(principal)]
Admin = Annotated[Principal, Depends(admin)]
