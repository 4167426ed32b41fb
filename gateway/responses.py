"""JSON responses in fal's shapes, and the two ASGI wrappers every response passes through. fal's clients
need JSON bodies on errors too and read `x-fal-request-id` (JS fills `requestId` from it)."""

from __future__ import annotations

import json
import re
import uuid

from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID = "x-fal-request-id"
ERROR_TYPE = "x-fal-error-type"
TIMEOUT_TYPE = "x-fal-request-timeout-type"
_HEADER_SAFE_ID = re.compile(r"[A-Za-z0-9._~-]{1,128}")


class FalError(Exception):
    """Ends a request with a JSON body (flat `{detail, error_type}` or fal's `{"status": ...}`)."""

    def __init__(
        self,
        status_code: int,
        body: dict,
        *,
        request_id: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(str(body))
        self.status_code, self.body, self.request_id, self.headers = (
            status_code,
            body,
            request_id,
            headers or {},
        )

    @classmethod
    def flat(cls, status_code: int, detail: str, error_type: str, **kwargs) -> FalError:
        headers = {ERROR_TYPE: error_type, **kwargs.pop("headers", {})}
        return cls(status_code, {"detail": detail, "error_type": error_type}, headers=headers, **kwargs)

    def response(self) -> Response:
        return fal_json(self.body, self.status_code, request_id=self.request_id, headers=self.headers)


def fal_json(
    body: object,
    status_code: int = 200,
    *,
    request_id: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    merged = {**(headers or {})}
    if request_id and _HEADER_SAFE_ID.fullmatch(request_id):
        # Only ids that fit in a header: a 404 for a garbage path id must not become a 500.
        merged[REQUEST_ID] = request_id
    return JSONResponse(body, status_code=status_code, headers=merged)


def stored_result(raw: str, code: int, error_type: str | None, request_id: str) -> Response:
    """The result exactly as stored (already JSON text): the output, or the error code and body with its
    type, and fal's marker for a caller-set timeout."""
    headers = {REQUEST_ID: request_id}
    if code >= 400 and error_type:
        headers[ERROR_TYPE] = error_type
        if error_type == "request_timeout":
            headers[TIMEOUT_TYPE] = "user"
    return Response(raw, status_code=code, media_type="application/json", headers=headers)


class RequestIdHeader:
    """Adds `x-fal-request-id` to responses that lack one (errors before a request id exists)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(key.lower() == REQUEST_ID.encode() for key, _ in headers):
                    headers.append((REQUEST_ID.encode(), str(uuid.uuid4()).encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_id)


SMALL_BODY = 1 << 20  # bodies up to this size never wait for the budget (status calls, URL submits)


class BodyLimit:
    """413 for bodies over the limit, by Content-Length or while streaming; and a memory budget for the large
    bodies being handled at once (`budget_bytes`, 0: none). A body is parsed, validated and decoded in
    memory (a few times its size at the peak), so a few large ones at once could exhaust the process: a body
    over SMALL_BODY reserves its size until its request is answered, and one that does not fit is a 429 with
    Retry-After (fal's clients retry it) before it is read."""

    def __init__(self, app: ASGIApp, *, max_bytes: int, budget_bytes: int = 0, retry_after: int = 1):
        self.app = app
        self.max_bytes = max_bytes
        self.budget, self.in_use = budget_bytes, 0  # one event loop per process: no lock needed
        self.retry_after = retry_after

    def _reserve(self, size: int, own: int = 0) -> bool:
        """Take `size` more bytes of the budget for a body that holds `own` already."""
        if self.budget and self.in_use + size > self.budget and self.in_use > own:
            return False  # a single body larger than the whole budget still runs, alone
        self.in_use += size
        return True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers", [])).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return await self._too_large(scope, receive, send)
        reserved = 0
        if length.isdigit() and int(length) > SMALL_BODY:
            if not self._reserve(int(length)):
                return await self._busy(scope, receive, send)
            reserved = int(length)
        seen = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal seen, reserved
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge
                if seen > max(reserved, SMALL_BODY):  # a body without Content-Length reserves as it arrives
                    if not self._reserve(seen - reserved, reserved):
                        raise _Busy
                    reserved = seen
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._too_large(scope, receive, send)
        except _Busy:
            if not started:
                await self._busy(scope, receive, send)
        finally:
            self.in_use -= reserved

    async def _busy(self, scope: Scope, receive: Receive, send: Send) -> None:
        await FalError.flat(
            429,
            "Too many large request bodies in progress; retry shortly",
            "server_busy",
            headers={"Retry-After": str(self.retry_after)},
        ).response()(scope, receive, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = json.dumps(
            {"detail": f"Request body exceeds {self.max_bytes} bytes", "error_type": "request_too_large"}
        ).encode()
        await Response(
            body, status_code=413, media_type="application/json", headers={ERROR_TYPE: "request_too_large"}
        )(scope, receive, send)


class _Busy(Exception):
    pass


class _TooLarge(Exception):
    pass
