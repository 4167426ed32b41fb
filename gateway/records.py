"""Cheap async reads of job records for status, streams and results (fal's Python client polls 10×/s),
in one Lua round trip; a record is visible only to the key that made it, until `gateway_result_retention`."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import cast

from common.domain.auth import ANONYMOUS, Principal
from common.domain.status import Status
from common.state import keys
from common.state.jobs import STATUS_FIELDS, STATUS_READ, status_read_call
from gateway.context import Gateway


@dataclass(frozen=True)
class Snapshot:
    request_id: str
    status: str
    variant: str
    result_code: int | None
    error: str | None
    error_type: str | None
    inference_time: float | None

    @property
    def completed(self) -> bool:
        return self.status == Status.COMPLETED

    @property
    def error_message(self) -> str | None:
        """fal's status `error`: "Invalid status code: N" for the model's 4xx, the message otherwise."""
        if not self.completed or not self.error_type:
            return None
        code = self.result_code or 500
        if 400 <= code < 500 and code != 499:
            return f"Invalid status code: {code}"
        return self.error or "Internal error"


@dataclass(frozen=True)
class StatusRead:
    snap: Snapshot
    position: int | None  # while IN_QUEUE
    logs: list[dict] | None  # when asked for: entries from the requested index on


async def read_status(
    gw: Gateway, request_id: str, principal: Principal, logs_from: int | None = None, *, watch: bool = False
) -> StatusRead | None:
    """The request as `principal` may see it (None: unknown, another key's, or past retention). `watch`:
    the caller waits for its changes next (subscribed already): the record is marked watched in the same
    call, so each transition after this read publishes its change, and one before it is in the read."""
    shard = gw.on_request(request_id)
    if shard.status_script is None:
        shard.status_script = shard.aredis.register_script(STATUS_READ)
    reply = await shard.status_script(**status_read_call(request_id, logs_from, watch=watch))
    if not reply:
        return None
    values, rank, entries = reply
    raw = dict(zip(STATUS_FIELDS, values, strict=True))
    if not raw["status"] or principal.key_id not in (ANONYMOUS, raw["owner"] or ""):
        return None
    completed_at = float(raw["completed_at"]) if raw["completed_at"] else None
    if completed_at is not None and completed_at + gw.settings.gateway_result_retention < time.time():
        return None
    snap = Snapshot(
        request_id=request_id,
        status=raw["status"],
        variant=raw["variant"] or "",
        result_code=int(raw["result_code"]) if raw["result_code"] else None,
        error=raw["error"] or None,
        error_type=raw["error_type"] or None,
        inference_time=float(raw["inference_time"]) if raw["inference_time"] else None,
    )
    position = (rank or 0) if snap.status == Status.IN_QUEUE else None
    return StatusRead(snap, position, [json.loads(e) for e in entries] if logs_from is not None else None)


async def result(gw: Gateway, request_id: str) -> tuple[str, int, str | None]:
    reply = await gw.on_request(request_id).aredis.hmget(
        keys.job(request_id), ["result", "result_code", "error_type"]
    )
    raw, code, error_type = cast(list[str | None], reply)  # a decoding client: str replies
    return raw or "null", int(code or 200), error_type or None


def status_body(
    snap: Snapshot, urls: dict[str, str], entries: list[dict] | None, position: int | None
) -> dict:
    """fal's status shape: `logs` always present (null unless asked for), `queue_position` only queued."""
    body: dict = {"status": snap.status, "request_id": snap.request_id, **urls}
    if snap.status == Status.IN_QUEUE:
        body["queue_position"] = position or 0
    body["logs"] = entries
    done = snap.completed and snap.inference_time is not None
    body["metrics"] = {"inference_time": snap.inference_time} if done else {}
    if snap.completed and snap.error_type:
        body["error"] = snap.error_message
        body["error_type"] = snap.error_type
    return body
