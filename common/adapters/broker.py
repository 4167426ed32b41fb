"""The broker's side of Redis: how kombu's Redis transport lays out Celery's queues and messages.

The only module that knows it. A queue is a list per priority step (`<queue>`, `<queue>\\x06\\x163`, ...);
without ack emulation (common/adapters/queue.py) a message leaves Redis when a worker pops it. A message
is a JSON envelope whose `headers` name the Celery task and its id and whose body (base64) is
`[args, kwargs, embed]`.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

import redis
from kombu import serialization
from kombu.transport.redis import PRIORITY_STEPS, Channel
from kombu.utils.json import dumps as json_dumps

_MALFORMED = (ValueError, KeyError, IndexError, TypeError, AttributeError)


@dataclass(frozen=True)
class TaskMessage:
    task: str | None  # the Celery task name
    task_id: str | None
    args: list

    @property
    def spec(self) -> dict | None:
        """The job spec a run-job task carries as its first argument."""
        first = self.args[0] if self.args else None
        return first if isinstance(first, dict) else None

    @property
    def job_request_id(self) -> str | None:
        """The request id of a run-job task's spec."""
        return self.spec.get("request_id") if self.spec else None

    @property
    def request_id(self) -> str | None:
        """The job a task is about: its spec's id, or the bare id other tasks (webhooks) take first."""
        if self.spec is not None:
            return self.job_request_id
        return self.args[0] if self.args else None


def decode(raw: str | bytes) -> TaskMessage | None:
    """A queue list entry; None when it is no message we understand."""
    try:
        message = json.loads(raw)
        if isinstance(message, str):
            message = json.loads(message)
        headers = message.get("headers") or {}
    except _MALFORMED:
        return None
    return TaskMessage(headers.get("task"), headers.get("id"), _args(message))


def _args(message: dict) -> list:
    try:
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return args if isinstance(args, list) else []
    except _MALFORMED:
        return []


@dataclass(frozen=True)
class StoredMessage:
    """A message as the transport stores it: the list it is pushed on (LPUSH; workers pop with BRPOP) and its
    JSON text."""

    list_key: str
    payload: str


def stored_message(
    queue: str, *, headers: dict, properties: dict, body: object, priority: int | None
) -> StoredMessage:
    """A Celery message (a task message's headers, properties and body) as kombu's Redis transport publishes
    it to `queue` through the default exchange: the body serialized as JSON and base64-encoded, the delivery
    properties added, on the list of its priority step. What `kombu.transport.redis.Channel._put` pushes, so
    a script can push it with the job's record (tests/integration/test_broker.py compares the two)."""
    content_type, content_encoding, data = serialization.dumps(body, serializer="json")
    raw = data.encode(content_encoding) if isinstance(data, str) else data
    clamped = min(max(priority or 0, Channel.min_priority), Channel.max_priority)
    step = max(step for step in PRIORITY_STEPS if step <= clamped)
    message = {
        "body": base64.b64encode(raw).decode("ascii"),
        "content-encoding": content_encoding,
        "content-type": content_type,
        "headers": headers,
        "properties": {
            **properties,
            "delivery_mode": 2,  # persistent
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": priority or 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    return StoredMessage(queue_lists(queue)[PRIORITY_STEPS.index(step)], json_dumps(message))


def queue_lists(queue: str) -> list[str]:
    """The Redis lists holding a Celery queue's messages, one per priority step."""
    return [queue if step == 0 else f"{queue}{Channel.sep}{step}" for step in PRIORITY_STEPS]


def depths(r: redis.Redis, queues: Iterable[str]) -> dict[str, int]:
    """Messages waiting in each queue (all priority steps)."""
    queues = list(queues)
    pipe = r.pipeline()
    for queue in queues:
        for key in queue_lists(queue):
            pipe.llen(key)
    lengths = pipe.execute()
    steps = len(PRIORITY_STEPS)
    return {q: sum(lengths[i * steps : (i + 1) * steps]) for i, q in enumerate(queues)}


def as_text(value: object) -> str:  # a Redis reply, from a decoding client or not
    return value.decode() if isinstance(value, bytes) else str(value)
