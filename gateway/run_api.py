"""Synchronous run (docs/api.md#run): a queue submit answered when done, with no server-side time limit
(fal's clients have none on run); a caller that hangs up cancels its request, as on fal."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from starlette.responses import Response

from common.domain.schemas import BiRefNetOutput
from common.domain.status import Status
from common.domain.variants import Endpoint
from common.state import keys
from gateway import records
from gateway.context import Gateway, gateway
from gateway.models import ERRORS, ErrorBody, ValidationErrorBody
from gateway.queue_api import (
    BAD_REQUEST,
    ENDPOINTS,
    LIMITED,
    LifecycleHeader,
    MaxQueueQuery,
    NoRetryHeader,
    PriorityHeader,
    TimeoutHeader,
    body_doc,
    cancel_job,
    options,
)
from gateway.responses import stored_result
from gateway.security import Caller
from gateway.submit import submit_job
from gateway.urls import APP_PATH

router = APIRouter(prefix="/run", tags=["run"])


async def _disconnected(request: Request) -> None:
    """Returns when the caller hangs up (the body is already read: the next ASGI message is the end)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def wait_completed(gw: Gateway, request: Request, request_id: str) -> bool:
    """Until the job completes (True) or the caller goes away first (False). Woken by the job's pub/sub
    events (gateway/push.py): no Redis command while nothing changes."""
    key = keys.job(request_id)
    hangup = asyncio.ensure_future(_disconnected(request))
    shard = gw.on_request(request_id)
    try:
        async with shard.events.watch(request_id) as watch:
            while await shard.aredis.hget(key, "status") != Status.COMPLETED:
                waiter = asyncio.ensure_future(watch.wait())
                await asyncio.wait({waiter, hangup}, return_when=asyncio.FIRST_COMPLETED)
                if hangup.done():
                    waiter.cancel()
                    return False
        return True
    finally:
        hangup.cancel()


def make_run(endpoint: Endpoint):
    async def run(
        request: Request,
        caller: Caller,
        timeout: TimeoutHeader = None,
        queue_priority: PriorityHeader = None,
        lifecycle: LifecycleHeader = None,
        no_retry: NoRetryHeader = None,
        max_queue_length: MaxQueueQuery = None,
    ) -> Response:
        gw = gateway(request)
        submitted = await run_in_threadpool(
            submit_job,
            gw,
            caller,
            await request.body(),
            options(
                endpoint,
                timeout,
                queue_priority,
                lifecycle,
                no_retry,
                max_queue_length=max_queue_length,
                watched=True,
            ),
        )
        return await run_answer(gw, request, submitted.request_id)

    run.__name__ = f"run_{endpoint}"
    return run


async def run_answer(gw: Gateway, request: Request, rid: str) -> Response:
    """The result once the job completes; a caller that hangs up first cancels it."""
    if not await wait_completed(gw, request, rid):
        await run_in_threadpool(cancel_job, gw, rid)
        return Response(status_code=499)  # nobody reads it
    return stored_result(*await records.result(gw, rid), rid)


for _endpoint, _suffix in ENDPOINTS.items():
    router.add_api_route(
        f"/{APP_PATH}{_suffix}",
        make_run(_endpoint),
        methods=["POST"],
        summary=f"Run fal-ai/birefnet{_suffix} and wait for the output",
        openapi_extra=body_doc(_endpoint),
        responses={
            **ERRORS,
            **BAD_REQUEST,
            **LIMITED,
            200: {"model": BiRefNetOutput, "description": "The model output"},
            422: {"model": ValidationErrorBody, "description": "The model rejected the input"},
            504: {"model": ErrorBody, "description": "X-Fal-Request-Timeout passed before it started"},
        },
    )
