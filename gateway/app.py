"""The gateway's FastAPI app: routers, fal-style errors, CORS, URL conventions and the sweeper.

Middleware, outermost first: CORS (answers preflights) → x-fal-request-id on every response → body limit →
URL conventions (routing.py) → request metrics (RED, per route template) → FastAPI.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.routing import Match

from common.observability.metrics import RequestMetrics, register_queue_collector, start_metrics_server
from common.settings import GatewaySettings
from gateway import compose_api, files_api, misc_api, playground_api, queue_api, run_api, video_api
from gateway.context import Gateway
from gateway.openapi import install_openapi
from gateway.parsing import json_safe
from gateway.responses import (
    ERROR_TYPE,
    REQUEST_ID,
    TIMEOUT_TYPE,
    BodyLimit,
    FalError,
    RequestIdHeader,
    fal_json,
)
from gateway.routing import FalRouting
from gateway.sweeper import sweep_forever
from gateway.urls import forwarded_trusted

log = logging.getLogger(__name__)
EXPOSED = [REQUEST_ID, ERROR_TYPE, TIMEOUT_TYPE, "x-fal-billable-units"]


def create_app(settings: GatewaySettings) -> FastAPI:

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        gw = Gateway.build(settings)
        app.state.gateway = gw
        start_metrics_server(settings.gateway_metrics_port, "gateway", host=settings.metrics_host)
        sweeper = asyncio.create_task(sweep_forever(gw))
        try:
            yield
        finally:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
            await gw.close()

    app = FastAPI(
        title="birefnet-serve gateway",
        version="0.1.0",
        lifespan=lifespan,
        description="fal.ai-compatible API for fal-ai/birefnet and fal-ai/birefnet/v2. Canonical routes are "
        "under /queue (queue API) and /run (synchronous run). The same routes answer at the root: on a host "
        "starting with `queue.` (and for request-scoped paths) as the queue API, otherwise as run. Trailing "
        "slashes are ignored, `/fal-ai/birefnet/v2/requests/...` equals `/fal-ai/birefnet/requests/...`, and "
        "`/api/fal/proxy` serves fal's JS proxy protocol (x-fal-target-url).",
    )
    for router in (
        video_api.queue_router,
        video_api.run_router,
        queue_api.router,
        run_api.router,
        files_api.router,
        misc_api.router,
        compose_api.router,
    ):
        app.include_router(router)
    app.include_router(playground_api.router)  # browser pages: /playground, /playground/ops
    register_queue_collector(settings)  # Prometheus: queue gauges, as the other processes export them
    install_exception_handlers(app)
    install_openapi(app, auth=settings.gateway_auth != "off")
    app.add_middleware(RequestMetrics)  # innermost: sees the route template the router matched
    app.add_middleware(FalRouting, trust_forwarded=lambda peer: forwarded_trusted(settings, peer))
    app.add_middleware(
        BodyLimit, max_bytes=settings.gateway_max_body_bytes, budget_bytes=settings.gateway_body_budget_bytes
    )
    app.add_middleware(RequestIdHeader)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=list(settings.gateway_cors_origins),
        allow_methods=["GET", "POST", "PUT", "OPTIONS"],
        allow_headers=["*"],
        expose_headers=EXPOSED,
        max_age=600,
    )
    return app


def app_from_environment() -> FastAPI:
    """uvicorn's factory (`python -m gateway`): each uvicorn worker process reads its own settings."""
    return create_app(GatewaySettings())


def install_exception_handlers(app: FastAPI) -> None:
    @app.exception_handler(FalError)
    async def fal_error(_: Request, exc: FalError) -> Response:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> Response:
        from fastapi.encoders import jsonable_encoder

        # Echoed inputs may be floats JSON cannot carry (`?minutes=nan` parses as NaN): spelled as text.
        return fal_json({"detail": json_safe(jsonable_encoder(exc.errors()))}, 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        detail = exc.detail
        headers = dict(exc.headers or {})
        if exc.status_code == 404 and request.url.path.startswith(("/queue/", "/run/")):
            detail = "Application not found"  # unknown app id or subpath (e.g. fal-ai/birefnet/v2/video)
        if exc.status_code == 405:
            headers = {k: v for k, v in headers.items() if k.lower() != "allow"}
            headers["allow"] = ", ".join(allowed_methods(request))
        return fal_json({"detail": detail}, exc.status_code, headers=headers)

    @app.exception_handler(ClientDisconnect)
    async def disconnected(request: Request, _: ClientDisconnect) -> Response:
        # The caller hung up while sending its body: nothing was accepted and nobody reads this answer.
        log.info(
            "client disconnected before its request body was complete: %s %s",
            request.method,
            request.url.path,
        )
        return fal_json({"detail": "Client disconnected", "error_type": "client_disconnected"}, 499)

    @app.exception_handler(redis.ConnectionError)
    async def redis_down(_: Request, exc: redis.ConnectionError) -> Response:
        log.warning("Redis unreachable: %s", exc)
        return FalError.flat(
            503, "Job store unreachable; retry shortly", "runner_connection_error"
        ).response()

    @app.exception_handler(RecursionError)
    async def too_deep(request: Request, exc: RecursionError) -> Response:
        # Defence in depth: parsing.py bounds every document's depth, so this is a parser that was missed.
        log.error(
            "input nested too deeply for %s %s (a parser outside parsing.py?)",
            request.method,
            request.url.path,
        )
        return FalError.flat(400, "Input nested too deeply", "bad_request").response()

    @app.exception_handler(Exception)
    async def crashed(_: Request, exc: Exception) -> Response:
        log.exception("unhandled gateway error")
        # Served outside the request-id middleware: give it an id here (fal's clients rely on one).
        return FalError.flat(
            500, "Internal gateway error", "internal_error", request_id=str(uuid.uuid4())
        ).response()


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path (a path's methods may be spread over several routes)."""
    allowed = []
    for method in _METHODS:
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] == Match.FULL for route in request.app.router.routes):
            allowed.append(method)
    return allowed


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
