"""JWKS for webhook receivers, health, failed webhook deliveries (admin), and the proxy route's 400."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from starlette.responses import Response

from common.observability.metrics import metrics_response
from common.state import webhooks
from gateway.context import gateway
from gateway.models import ERRORS, ErrorBody, FailedWebhooks
from gateway.responses import FalError, fal_json
from gateway.routing import PROXY_PATH
from gateway.security import Admin

router = APIRouter()


@router.get("/.well-known/jwks.json", tags=["webhooks"])
async def jwks(request: Request) -> Response:
    """Public keys that verify X-Fal-Webhook-Signature (receivers may cache this up to 24 h)."""
    return fal_json(gateway(request).signer.jwks(), headers={"cache-control": "public, max-age=3600"})


@router.get("/healthz", tags=["ops"])
async def healthz(request: Request) -> Response:
    """200 when this gateway can reach Redis (a readiness check; same as /readyz)."""
    try:
        # Shard 0: what every request may need (per-key limits, the auth throttle). Another shard being
        # down fails only its variants' requests (503), not this gateway's readiness.
        await gateway(request).aredis.ping()
    except Exception as exc:
        raise FalError.flat(503, f"Redis unreachable: {exc}", "runner_connection_error") from exc
    return fal_json({"status": "ok"})


router.add_api_route(
    "/readyz",
    healthz,
    methods=["GET"],
    tags=["ops"],
    operation_id="readyz",
    summary="Readyz",
    description="200 when this gateway can reach Redis (readiness probe).",
)


@router.get("/livez", tags=["ops"])
async def livez() -> Response:
    """200 while the process serves requests; never touches Redis, so a Redis outage does not make a
    liveness probe restart every gateway."""
    return fal_json({"status": "ok"})


@router.get("/metrics", include_in_schema=False)
async def metrics(_: Admin) -> Response:
    """Prometheus metrics; an admin key when auth is on (or without a key on gateway_metrics_port)."""
    return metrics_response()


@router.get(
    "/admin/webhooks/failed",
    tags=["ops"],
    response_model=FailedWebhooks,
    responses={**ERRORS, 403: {"model": ErrorBody, "description": "Not an admin key"}},
)
async def failed_webhooks(
    request: Request, caller: Admin, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> Response:
    """Requests whose webhook never got a 2xx after every retry, newest first, with each attempt."""
    gw = gateway(request)
    failed: list[dict] = []
    for shard in gw.shards:  # each shard's deliverer keeps its own
        failed += await run_in_threadpool(webhooks.failed_webhooks, shard.store, limit)
    failed.sort(key=lambda entry: entry["failed_at"], reverse=True)
    return fal_json({"failed": failed[:limit]})


async def proxy(request: Request) -> Response:
    """fal's JS `proxyUrl` target. Requests whose `x-fal-target-url` names https://queue.fal.run/...,
    https://fal.run/... or https://rest.fal.ai/... are served as that route (same method, body and
    Authorization); anything else ends here."""
    raise FalError(
        400,
        {
            "detail": "Invalid request: x-fal-target-url must be a queue.fal.run, fal.run or rest.fal.ai URL",
            "error_type": "bad_request",
        },
    )


# Documented, not enforced by FastAPI: a missing or foreign target is fal's 400, not a 422.
_TARGET = {
    "name": "x-fal-target-url",
    "in": "header",
    "required": True,
    "description": "The fal URL this request stands for (fal's JS client sets it).",
    "schema": {"type": "string", "pattern": r"^https://(queue\.fal\.run|fal\.run|rest\.fal\.ai)/"},
}
for _method in ("GET", "POST", "PUT"):
    router.add_api_route(
        PROXY_PATH,
        proxy,
        methods=[_method],
        tags=["proxy"],
        operation_id=f"proxy_{_method.lower()}",
        openapi_extra={"parameters": [_TARGET]},
        responses={
            400: {"model": ErrorBody, "description": "Missing or foreign x-fal-target-url"},
            "default": {"description": "Whatever the target route answers"},
        },
    )
