"""The gateway's FastAPI app: routers, fal-style errors, CORS, URL conventions and the sweeper.

Middleware, outermost first: CORS (answers preflights) → x-fal-request-id on every response → body limit →
URL conventions (routing.py) → FastAPI.
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
from starlette.responses import Response

from common.metrics import add_metrics_route
from common.settings import Settings
from producer.gateway import compose_api, files_api, misc_api, playground_api, queue_api, run_api
from producer.gateway.openapi import install_openapi
from producer.gateway.responses import (
    ERROR_TYPE,
    REQUEST_ID,
    TIMEOUT_TYPE,
    BodyLimit,
    FalError,
    RequestIdHeader,
    fal_json,
)
from producer.gateway.routing import FalRouting
from producer.gateway.state import Gateway
from producer.gateway.sweeper import sweep_forever

log = logging.getLogger(__name__)
EXPOSED = [REQUEST_ID, ERROR_TYPE, TIMEOUT_TYPE, "x-fal-billable-units"]


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        gw = Gateway.build(settings)
        app.state.gateway = gw
        sweeper = asyncio.create_task(sweep_forever(gw))
        try:
            yield
        finally:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
            await gw.close()

    app = FastAPI(
        title="birefnet-serve gateway", version="0.1.0", lifespan=lifespan,
        description="fal.ai-compatible API for fal-ai/birefnet and fal-ai/birefnet/v2. Canonical routes are "
        "under /queue (queue API) and /run (synchronous run). The same routes answer at the root: on a host "
        "starting with `queue.` (and for request-scoped paths) as the queue API, otherwise as run. Trailing "
        "slashes are ignored, `/fal-ai/birefnet/v2/requests/...` equals `/fal-ai/birefnet/requests/...`, and "
        "`/api/fal/proxy` serves fal's JS proxy protocol (x-fal-target-url).",
    )
    for router in (queue_api.router, run_api.router, files_api.router, misc_api.router, compose_api.router):
        app.include_router(router)
    app.include_router(playground_api.router)  # browser pages: /playground, /playground/ops
    add_metrics_route(app, settings)  # Prometheus: queue gauges, as the other processes export them
    install_exception_handlers(app)
    install_openapi(app)
    app.add_middleware(FalRouting, trust_forwarded=settings.gateway_trust_forwarded)
    app.add_middleware(BodyLimit, max_bytes=settings.gateway_max_body_bytes)
    app.add_middleware(RequestIdHeader)
    app.add_middleware(CORSMiddleware, allow_origins=list(settings.gateway_cors_origins),
                       allow_methods=["GET", "POST", "PUT", "OPTIONS"], allow_headers=["*"],
                       expose_headers=EXPOSED, max_age=600)
    return app


def install_exception_handlers(app: FastAPI) -> None:
    @app.exception_handler(FalError)
    async def fal_error(_: Request, exc: FalError) -> Response:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> Response:
        from fastapi.encoders import jsonable_encoder

        return fal_json({"detail": jsonable_encoder(exc.errors())}, 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        detail = exc.detail
        if exc.status_code == 404 and request.url.path.startswith(("/queue/", "/run/")):
            detail = "Application not found"  # unknown app id or subpath (e.g. fal-ai/birefnet/v2/video)
        return fal_json({"detail": detail}, exc.status_code, headers=dict(exc.headers or {}))

    @app.exception_handler(redis.ConnectionError)
    async def redis_down(_: Request, exc: redis.ConnectionError) -> Response:
        log.warning("Redis unreachable: %s", exc)
        return FalError.flat(503, "Job store unreachable; retry shortly", "runner_connection_error").response()

    @app.exception_handler(Exception)
    async def crashed(_: Request, exc: Exception) -> Response:
        log.exception("unhandled gateway error")
        # Served outside the request-id middleware: give it an id here (fal's clients rely on one).
        return FalError.flat(500, "Internal gateway error", "internal_error", request_id=str(uuid.uuid4())).response()
