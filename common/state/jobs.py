"""Job records in Redis: status, logs, result, queue position, and the per-job lease.

State changes are Lua scripts, so a cancel, a claim by a worker and a completion can race safely: `claim`
moves IN_QUEUE -> IN_PROGRESS and takes a lease (the holder's token in the record, and the time the lease
lapses as the job's score in its variant's running set, which the running worker renews), so a redelivered
copy of a job whose lease is alive is deferred, never run twice, and one whose lease lapsed (its worker
died) is claimed again, up to `max_attempts` times; only the first `complete` (by the lease holder, or by
anyone once the lease lapsed) is recorded, so a job gets exactly one result and one webhook (fal's
cancelled one when a cancel was requested while it ran). The claim and the completion also keep the ops
state (running set, completions stream) and send the job's one change notice when a caller watches it (the
record's `watched` mark, set by the gateway before it waits): the worker sends no command of its own for
these. Lease times are the workers' clocks (unix seconds): they must agree to well within a lease (NTP).

A record has no TTL while its job waits or runs (every job ends: by a worker, a cancel, a start deadline or
the orphan sweep's retries); the end sets it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal, cast

import redis
from redis.typing import EncodableT, FieldT

from common.adapters.broker import StoredMessage
from common.domain.errors import RequestCancelled
from common.domain.schemas import JobSpec
from common.domain.status import Status
from common.settings import JobSettings
from common.state import keys

ClaimOutcome = Literal["claimed", "completed", "leased", "exhausted", "missing"]
CancelOutcome = Literal["cancelled", "requested", "already_completed", "not_found"]


def _lua_string(text: str) -> str:
    """`text` as a Lua string literal (JSON's escapes are Lua's for what JSON strings hold here)."""
    return json.dumps(text)


# KEYS: record, pending zset, job channel, running set. ARGV: lease token, when the lease lapses, now, max
# attempts, request id, worker, variant, the run's first log line ('' for none; not written when a cancel
# waits: the run ends at once). One read of the record's fields; the running set is looked at only for a
# copy of a job already IN_PROGRESS (its score there is when its lease lapses). The claim returns the run
# flags the worker acts on, the record's log line count after its own line (the lease holder numbers its
# lines from it) and whether a caller watches the job (the record's `watched` mark, set by the gateway
# before it waits: only then is the change published). The first line in the claim's HSET shows every run
# in the log, even one whose worker is killed before it writes another.
_CLAIM = """
local f = redis.call('HMGET', KEYS[1], 'status', 'attempts', 'cancel_requested', 'run_alone', 'log_count',
                    'watched')
local status = f[1]
if not status then return {'missing'} end
if status == 'COMPLETED' then return {'completed'} end
if status == 'IN_PROGRESS' then
  local lapses = redis.call('ZSCORE', KEYS[4], ARGV[5])
  if lapses and tonumber(lapses) > tonumber(ARGV[3]) then return {'leased'} end
else
  redis.call('ZREM', KEYS[2], ARGV[5])
end
local attempts = (tonumber(f[2]) or 0) + 1
if f[6] then redis.call('PUBLISH', KEYS[3], ARGV[7]) end  -- a caller waits on it
if attempts > tonumber(ARGV[4]) then
  redis.call('HSET', KEYS[1], 'attempts', attempts)
  return {'exhausted'}
end
local fields = {'status', 'IN_PROGRESS', 'started_at', ARGV[3], 'worker', ARGV[6], 'attempts', attempts,
                'lease', ARGV[1]}
local count = tonumber(f[5]) or 0
if ARGV[8] ~= '' and f[3] ~= '1' then
  fields[#fields + 1] = 'log:' .. count
  fields[#fields + 1] = ARGV[8]
  count = count + 1
  fields[#fields + 1] = 'log_count'
  fields[#fields + 1] = count
end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('ZADD', KEYS[4], ARGV[2], ARGV[5])
return {'claimed', f[3] or '', f[4] or '', tostring(count), f[6] or ''}
"""

# KEYS: record, running set. ARGV: lease token, when the lease now lapses, request id. Only the holder renews,
# and only a job still in the running set (XX: a completion took it out).
_RENEW = """
if redis.call('HGET', KEYS[1], 'lease') ~= ARGV[1] then return 0 end
redis.call('ZADD', KEYS[2], 'XX', ARGV[2], ARGV[3])
return 1
"""

# ARGV: lease token, request id, record TTL, webhook booking ('' for none), its due time, completed at, the
# run report (outcome, '' for none; worker; run seconds; entries kept; error type), the variant, log entries
# count n, n log entries, then the outcome's field/value pairs. KEYS: record, pending zset, webhook schedule,
# job channel, webhook ready list, running set, completions stream. One round trip ends a job: outcome,
# TTL, the stage's log lines (numbered on from the record's count, in the same HSET), the first webhook
# booking (with the completion, so it exists iff the job completed) and its hand-off to the deliverers (a
# JSON object with what the attempt needs, so the deliverer reads nothing), its change notice (naming the
# variant when a queued job left its queue), and the ops state (out of the running set, the completions
# stream entry). A run other than the lease holder's completes a running job only once the lease lapsed. A
# cancel requested while the job ran is honoured here: fal's cancelled outcome (what `cancel` records for a
# queued job) is recorded instead of the one given. Returns {1, or 2 when it recorded the cancel; the
# record's created and started times (the worker's metrics)}, or 0 when this call did not complete the job.
_CANCELLED = RequestCancelled()
_COMPLETE = """
local f = redis.call('HMGET', KEYS[1], 'status', 'created_at', 'started_at', 'cancel_requested', 'log_count',
                    'watched', 'lease', 'webhook_url', 'webhook_user')
local status, created, started = f[1], f[2], f[3]
if (not status) or status == 'COMPLETED' then return 0 end
if status == 'IN_PROGRESS' and f[7] and f[7] ~= ARGV[1] then  -- another run's lease, unless it lapsed
  local lapses = redis.call('ZSCORE', KEYS[6], ARGV[2])
  if lapses and tonumber(lapses) > tonumber(ARGV[6]) then return 0 end
end
local n = tonumber(ARGV[13])
local ended, outcome, error_type = 1, ARGV[7], ARGV[11]
local fields = {'status', 'COMPLETED'}
if f[4] == '1' then  -- a cancel requested while it ran: fal's cancelled outcome, as `cancel` records it
  ended, outcome, error_type = 2, 'cancelled', CANCELLED_TYPE
  fields = {'status', 'COMPLETED', 'completed_at', ARGV[6], 'result', CANCELLED_BODY,
            'result_code', CANCELLED_CODE, 'error', CANCELLED_MESSAGE, 'error_type', error_type}
else
  for i = 14 + n, #ARGV do fields[#fields + 1] = ARGV[i] end
end
local outcome_fields = #fields
if n > 0 then  -- the last lines, numbered on from the record's count
  local first = tonumber(f[5]) or 0
  for i = 1, n do
    fields[#fields + 1] = 'log:' .. (first + i - 1)
    fields[#fields + 1] = ARGV[13 + i]
  end
  fields[#fields + 1] = 'log_count'
  fields[#fields + 1] = first + n
end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('EXPIRE', KEYS[1], ARGV[3])
local moved = ''  -- the variant, when the queue's order changes too
if status == 'IN_PROGRESS' then
  redis.call('ZREM', KEYS[6], ARGV[2])  -- the claim put it in the running set (and took it off the queue)
else
  redis.call('ZREM', KEYS[2], ARGV[2])
  moved = ARGV[12]
end
if ARGV[4] ~= '' then
  redis.call('ZADD', KEYS[3], 'NX', ARGV[5], ARGV[4])
  local given = {}
  for i = 3, outcome_fields, 2 do given[fields[i]] = fields[i + 1] end
  -- the bare booking, for the deliverer to read the record, if from before the URL's field or a big result
  local handed = ARGV[4]
  if f[8] and #(given['result'] or '') <= HANDOFF_MAX_RESULT then
    handed = cjson.encode({booking = ARGV[4], due = ARGV[5], url = f[8], user = f[9] or '',
                           result = given['result'], result_code = given['result_code'],
                           error = given['error']})
  end
  redis.call('LPUSH', KEYS[5], handed)
end
if f[6] then redis.call('PUBLISH', KEYS[4], moved) end  -- a caller waits on it
if ARGV[7] ~= '' then
  local wait, latency = '', ''
  if created and started then wait = string.format('%.4f', tonumber(started) - tonumber(created)) end
  if created then latency = string.format('%.4f', tonumber(ARGV[6]) - tonumber(created)) end
  redis.call('XADD', KEYS[7], 'MAXLEN', '~', ARGV[10], '*', 'request_id', ARGV[2], 'variant', ARGV[12],
             'outcome', outcome, 'error_type', error_type, 'worker', ARGV[8], 'queue_wait', wait,
             'run', ARGV[9], 'latency', latency)
end
return {ended, created or '', started or ''}
"""
# A result larger than this (data URIs of a sync_mode job) is not copied into the hand-off: the deliverer
# reads it from the record.
HANDOFF_MAX_RESULT = 64 * 1024
_COMPLETE = _COMPLETE.replace("HANDOFF_MAX_RESULT", str(HANDOFF_MAX_RESULT))
for _name, _value in {
    "CANCELLED_BODY": json.dumps(_CANCELLED.body()),
    "CANCELLED_CODE": str(_CANCELLED.status_code),
    "CANCELLED_MESSAGE": _CANCELLED.message,
    "CANCELLED_TYPE": _CANCELLED.error_type,
}.items():
    _COMPLETE = _COMPLETE.replace(_name, _lua_string(_value))

# Log lines from a writer that does not number them itself (not the lease holder of an image job): the next
# numbers are taken here, atomically. KEYS: record, job channel. ARGV: the lines. Nothing on a record that
# is gone (a line must not recreate it without its TTL).
_APPEND_LOGS = """
local f = redis.call('HMGET', KEYS[1], 'status', 'log_count', 'watched')
if not f[1] then return false end
local first = tonumber(f[2]) or 0
local fields = {}
for i = 1, #ARGV do
  fields[#fields + 1] = 'log:' .. (first + i - 1)
  fields[#fields + 1] = ARGV[i]
end
fields[#fields + 1] = 'log_count'
fields[#fields + 1] = first + #ARGV
redis.call('HSET', KEYS[1], unpack(fields))
if f[3] then redis.call('PUBLISH', KEYS[2], '') end  -- a caller waits on it
return first + #ARGV
"""

# KEYS: record, pending zset, running set. ARGV: lease token, request id, '1' to refund the attempt, queue
# score. Only the lease holder's run gives its job back (out of the running set, into the queue).
_REQUEUE = """
local f = redis.call('HMGET', KEYS[1], 'status', 'lease')
if f[1] ~= 'IN_PROGRESS' or f[2] ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'status', 'IN_QUEUE', 'lease', '')
if ARGV[3] == '1' then redis.call('HINCRBY', KEYS[1], 'attempts', -1) end
redis.call('ZREM', KEYS[3], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[2])
return 1
"""

_CANCEL = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'not_found' end
if status == 'COMPLETED' then return 'already_completed' end
if status == 'IN_PROGRESS' then
  redis.call('HSET', KEYS[1], 'cancel_requested', '1')
  return 'requested'
end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HSET', KEYS[1], 'status', 'COMPLETED', unpack(ARGV, 3))
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 'cancelled'
"""

# A new IN_QUEUE record (no TTL until its job ends), its queue entry, its broker message and its bookings in
# schedules, in one round trip; answers false when asked to check (ARGV[7] '1') and a record with this id
# exists, else its queue position (0 = next) when asked for (ARGV[8] '1'), else -1. KEYS: record, pending
# zset, the message's list, then the n schedules (sorted sets). ARGV[1..6]: spec, created_at, variant, owner,
# queue score, request id; ARGV[9]: the Celery message as the broker stores it ('' for none: the caller
# sends it); ARGV[10]: n, then n (member, due) pairs, then more field/value pairs of the record
# (`webhook_fields`). A job queued ahead of waiting ones (a normal job before low-priority ones) tells
# nobody: queued callers poll their position.
_CREATE = """
if ARGV[7] == '1' and redis.call('EXISTS', KEYS[1]) == 1 then return false end
local n = tonumber(ARGV[10])
redis.call('HSET', KEYS[1], 'spec', ARGV[1], 'status', 'IN_QUEUE', 'created_at', ARGV[2], 'variant', ARGV[3],
           'owner', ARGV[4], 'attempts', 0, unpack(ARGV, 11 + 2 * n))
redis.call('ZADD', KEYS[2], ARGV[5], ARGV[6])
if ARGV[9] ~= '' then redis.call('LPUSH', KEYS[3], ARGV[9]) end
for i = 1, n do redis.call('ZADD', KEYS[3 + i], ARGV[10 + 2 * i], ARGV[9 + 2 * i]) end
if ARGV[8] == '1' then return redis.call('ZRANK', KEYS[2], ARGV[6]) end
return -1
"""

_POP_DUE = """
local items = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, member in ipairs(items) do redis.call('ZREM', KEYS[1], member) end
return items
"""

# The gateway's status read (run on its async client): the record's small fields (never the spec, which
# may carry a data URI), the queue rank while queued, and logs from an index when asked for (the record's
# `log:<n>` fields; a record written before they existed has its lines in a list), in one round trip; for
# a caller about to wait it first marks the record `watched` (ARGV[4] '1'), so every transition after the
# read publishes its change. (The pending key is derived inside: fine on one Redis, not on a cluster.)
STATUS_FIELDS = (
    "status",
    "owner",
    "variant",
    "result_code",
    "error",
    "error_type",
    "inference_time",
    "completed_at",
)
STATUS_READ = f"""
local fields = redis.call('HMGET', KEYS[1], {", ".join(repr(name) for name in STATUS_FIELDS)})
if not fields[1] then return false end
if ARGV[4] == '1' then redis.call('HSET', KEYS[1], 'watched', '1') end  -- a caller waits: publish changes
local rank = false
if fields[1] == 'IN_QUEUE' then rank = redis.call('ZRANK', ARGV[1] .. fields[3], ARGV[2]) end
local logs = {{}}
if ARGV[3] ~= '' then
  local count = redis.call('HGET', KEYS[1], 'log_count')
  if not count then
    logs = redis.call('LRANGE', KEYS[2], tonumber(ARGV[3]), -1)  -- a record from before the lines moved in
  elseif tonumber(count) > tonumber(ARGV[3]) then
    local names = {{}}
    for i = tonumber(ARGV[3]), tonumber(count) - 1 do names[#names + 1] = 'log:' .. i end
    logs = redis.call('HMGET', KEYS[1], unpack(names))
  end
end
return {{fields, rank, logs}}
"""


def status_read_call(request_id: str, logs_from: int | None, *, watch: bool = False) -> dict:
    """`keys` and `args` for STATUS_READ; `watch`: mark the record watched in the same call (a caller that
    waits for its changes: the transitions after this read publish them)."""
    return {
        "keys": [keys.job(request_id), keys.logs(request_id)],
        "args": [
            keys.PENDING_PREFIX,
            request_id,
            "" if logs_from is None else logs_from,
            "1" if watch else "",
        ],
    }


# Fields a restart clears: what the previous run left (ops requeue of a failed job).
_RESET_FIELDS = (
    "started_at",
    "completed_at",
    "result",
    "result_code",
    "error",
    "error_type",
    "inference_time",
    "extra",
    "last_error",
    "worker",
    "cancel_requested",
    "webhook_delivered",
    "webhook_next",
)


def webhook_fields(spec: JobSpec) -> dict[str, str]:
    """What the webhook deliverer needs of the spec, as record fields of their own: it reads them without
    the spec, which may carry a data URI of up to 256 KB (common.state.webhooks.delivery_state)."""
    if not spec.webhook_url:
        return {}
    # X-Fal-Webhook-User-Id: the key owner's user id (set by the gateway), else the job's owner.
    user = str(spec.extra.get("user_id") or spec.owner or "system")
    return {"webhook_url": spec.webhook_url, "webhook_user": user}


def utc_timestamp() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def log_entry(message: str, level: str = "INFO") -> str:
    """One stored log line (fal's log shape), stamped now."""
    return json.dumps({"message": message, "level": level, "source": "USER", "timestamp": utc_timestamp()})


@dataclass
class JobRecord:
    request_id: str
    status: Status
    spec: JobSpec
    created_at: float
    started_at: float | None = None
    completed_at: float | None = None
    result: dict | None = None  # the body the result endpoint returns (output or error body)
    result_code: int | None = None
    error: str | None = None
    error_type: str | None = None
    inference_time: float | None = None
    attempts: int = 0
    cancel_requested: bool = False
    worker: str | None = None
    extra: dict = field(default_factory=dict)
    webhook_delivered: bool = False  # a webhook attempt got a 2xx (common.state.webhooks)
    webhook_next: int = 0  # the webhook attempts before this one failed (common.state.webhooks)

    @property
    def ok(self) -> bool:
        return self.status == Status.COMPLETED and self.error is None


@dataclass(frozen=True)
class Claim:
    """What `JobStore.claim` found: its outcome and, for a claimed job, the flags its run acts on."""

    outcome: ClaimOutcome
    started_at: float  # the claim's time, the record's started_at when claimed
    cancel_requested: bool = False  # a cancel came while an earlier run held the job
    run_alone: bool = False  # the next run takes a forward by itself (JobStore.note_error)
    watched: bool = False  # a caller waits on the job: its changes are published
    log_count: int = 0  # the record's log lines so far (a sole writer numbers its lines on from here)


@dataclass(frozen=True)
class RunReport:
    """The completions-stream entry (what ops and metrics read) a worker's completion appends."""

    outcome: str  # the runner's Outcome kind: done, failed or cancelled
    worker: str
    run_seconds: float | None = None
    keep: int = 100_000  # entries the stream keeps (approximately)


@dataclass(frozen=True)
class Completed:
    """A completion this call recorded, with the record's times (the worker's queue-wait metric)."""

    created_at: float | None
    started_at: float | None
    error_type: str = ""
    cancelled: bool = False  # a cancel requested while the job ran was recorded instead of the outcome given

    @property
    def queue_wait(self) -> float | None:
        """Seconds from created to started, if both are known."""
        if self.created_at is None or self.started_at is None:
            return None
        return self.started_at - self.created_at


@dataclass(frozen=True)
class Restart:
    """What `JobStore.restart_failed` found and did."""

    previous: JobRecord | None  # None: no such record
    was_dead_letter: bool = False
    spec: JobSpec | None = None  # the spec sent again; None: not restarted (not a failed job)


class JobStore:
    def __init__(self, client: redis.Redis, *, record_ttl: int = 7 * 24 * 3600):
        self.redis = client
        self.record_ttl = record_ttl
        self._claim = client.register_script(_CLAIM)
        self._renew = client.register_script(_RENEW)
        self._complete = client.register_script(_COMPLETE)
        self._cancel = client.register_script(_CANCEL)
        self._pop_due = client.register_script(_POP_DUE)
        self._requeue = client.register_script(_REQUEUE)
        self._create = client.register_script(_CREATE)
        self._append_logs = client.register_script(_APPEND_LOGS)
        # The next log line number of each job this process holds as its sole log writer (an image job's
        # lease holder): its lines are one HSET, numbered from the claim's count.
        self._log_next: dict[str, int] = {}
        self._watched: set[str] = set()  # those of them a caller watched at their claim: a flush publishes

    @classmethod
    def from_url(cls, url: str, **kwargs) -> JobStore:
        return cls(redis.Redis.from_url(url, decode_responses=True), **kwargs)

    @classmethod
    def from_settings(cls, settings: JobSettings) -> JobStore:
        """The store on the configured Redis (TLS, ACL, Sentinel: common.adapters.redis_conn)."""
        from common.adapters.redis_conn import redis_client

        return cls(redis_client(settings), record_ttl=settings.job_record_ttl)

    def notify(self, request_id: str, variant: str | None = None, pipe=None) -> None:
        """Tell waiting callers (gateway status streams and sync runs) that the job changed (the rare
        transitions sent from here publish whether watched or not; the scripts' only when the record is
        marked `watched`), and with
        `variant` that its queue's order changed too: one PUBLISH on the job's channel whose message is the
        variant (else empty), sent now or on the caller's pipeline. gateway.push wakes the job's watchers
        and, for a variant, that queue's."""
        target = pipe if pipe is not None else self.redis
        target.publish(keys.job_channel(request_id), variant or "")

    # --- creation and lookup ---
    def create(
        self,
        spec: JobSpec,
        schedule: Mapping[str, tuple[str, float]] | None = None,
        *,
        message: StoredMessage | None = None,
    ) -> bool:
        """Record a new IN_QUEUE job, and book `schedule` (sorted set -> (member, due)) and push its broker
        `message` (common.adapters.queue.job_message) with it, in one round trip; False (nothing written) if
        a record with this id exists already."""
        return self._run_create(spec, schedule, message, check=True, answer_position=False) is not None

    def create_queued(
        self,
        spec: JobSpec,
        schedule: Mapping[str, tuple[str, float]] | None = None,
        *,
        message: StoredMessage | None = None,
        watched: bool = False,
    ) -> int:
        """`create` for a request id just minted (an API submission: no record can have it, so none is looked
        for), answering the new job's queue position (0 = next) in the same round trip. `watched`: a caller
        will wait on it (a sync run): its transitions publish their changes from the start."""
        position = self._run_create(
            spec, schedule, message, check=False, answer_position=True, watched=watched
        )
        assert position is not None  # only a checked creation answers "exists"
        return position

    def _run_create(
        self,
        spec: JobSpec,
        schedule: Mapping[str, tuple[str, float]] | None,
        message: StoredMessage | None,
        *,
        check: bool,
        answer_position: bool,
        watched: bool = False,
    ) -> int | None:
        bookings = list((schedule or {}).items())
        reply = self._create(
            keys=[
                keys.job(spec.request_id),
                keys.pending(spec.variant),
                message.list_key if message is not None else spec.queue,
                *[key for key, _ in bookings],
            ],
            args=[
                spec.model_dump_json(),
                repr(spec.created_at),
                spec.variant,
                spec.owner or "",
                repr(keys.queue_score(spec.created_at, spec.priority)),
                spec.request_id,
                "1" if check else "0",
                "1" if answer_position else "0",
                message.payload if message is not None else "",
                len(bookings),
                *[item for _, (member, due) in bookings for item in (member, repr(due))],
                *[item for pair in webhook_fields(spec).items() for item in pair],
                *(["watched", "1"] if watched else []),
            ],
        )
        return None if reply is None else int(reply)

    def ensure(self, spec: JobSpec) -> None:
        """Recreate a record lost with Redis data (the message carries the full spec)."""
        if not self.redis.exists(keys.job(spec.request_id)):
            self.create(spec)

    def get(self, request_id: str) -> JobRecord | None:
        raw = cast(dict[str, str], self.redis.hgetall(keys.job(request_id)))  # a decoding client: str replies
        if not raw or "spec" not in raw or "status" not in raw:
            return None

        def num(name: str) -> float | None:
            return float(raw[name]) if raw.get(name) else None

        return JobRecord(
            request_id=request_id,
            status=Status(raw["status"]),
            spec=JobSpec.model_validate_json(raw["spec"]),
            created_at=float(raw.get("created_at") or 0),
            started_at=num("started_at"),
            completed_at=num("completed_at"),
            result=json.loads(raw["result"]) if raw.get("result") else None,
            result_code=int(raw["result_code"]) if raw.get("result_code") else None,
            error=raw.get("error") or None,
            error_type=raw.get("error_type") or None,
            inference_time=num("inference_time"),
            attempts=int(raw.get("attempts") or 0),
            cancel_requested=raw.get("cancel_requested") == "1",
            worker=raw.get("worker") or None,
            extra=json.loads(raw["extra"]) if raw.get("extra") else {},
            webhook_delivered=raw.get("webhook_delivered") == "1",
            webhook_next=int(raw.get("webhook_next") or 0),
        )

    def status(self, request_id: str) -> Status | None:
        raw = cast(str | None, self.redis.hget(keys.job(request_id), "status"))  # a decoding client
        return Status(raw) if raw else None

    def queue_position(self, request_id: str, variant: str) -> int | None:
        """0 = next to run in its variant's queue; None once it left the queue."""
        return cast(int | None, self.redis.zrank(keys.pending(variant), request_id))  # no withscore: int

    def queue_depth(self, variant: str) -> int:
        return self.redis.zcard(keys.pending(variant))

    # --- logs ---
    def log(self, request_id: str, message: str, level: str = "INFO") -> None:
        self.log_many(request_id, [log_entry(message, level)])

    def log_many(self, request_id: str, entries: list[str]) -> None:
        """Append log entries (`log_entry`) to the job's record in one round trip: a stage's lines together,
        not one by one. The record's TTL covers them. A sole writer (the process that claimed an image job)
        numbers them itself, from its claim's count: one HSET; any other writer goes through a script that
        takes the next numbers atomically."""
        if not entries:
            return
        first = self._log_next.get(request_id)
        if first is None:
            self._append_logs(keys=[keys.job(request_id), keys.job_channel(request_id)], args=entries)
            return
        fields: dict[FieldT, EncodableT] = {keys.log_field(first + i): e for i, e in enumerate(entries)}
        fields[keys.LOG_COUNT_FIELD] = first + len(entries)
        if request_id in self._watched:
            pipe = self.redis.pipeline(transaction=False)
            pipe.hset(keys.job(request_id), mapping=fields)
            self.notify(request_id, pipe=pipe)
            pipe.execute()
        else:
            self.redis.hset(keys.job(request_id), mapping=fields)
        self._log_next[request_id] = first + len(entries)

    def logs(self, request_id: str, start: int = 0) -> list[dict]:
        count = cast(str | None, self.redis.hget(keys.job(request_id), keys.LOG_COUNT_FIELD))
        if count is None:  # a record from before the lines moved into it
            return [json.loads(item) for item in self.redis.lrange(keys.logs(request_id), start, -1)]
        names = [keys.log_field(n) for n in range(start, int(count))]
        if not names:
            return []
        return [json.loads(item) for item in cast(list[str], self.redis.hmget(keys.job(request_id), names))]

    # --- worker side ---
    def claim(
        self,
        request_id: str,
        variant: str,
        token: str,
        *,
        lease_seconds: float,
        max_attempts: int,
        worker: str,
        sole_log_writer: bool = False,
        first_line: str = "",
    ) -> Claim:
        """Take the job for a run (IN_QUEUE -> IN_PROGRESS, a lease, the running set), in one round trip.
        `sole_log_writer`: no other process writes this job's log lines while it runs (an image job; a
        video's segments write to theirs), so `log_many` numbers them here, until the completion or
        requeue. `first_line` (a `log_entry`): the run's first log line, written by the claim (unless a
        cancel waits)."""
        now = time.time()
        reply = self._claim(
            keys=[
                keys.job(request_id),
                keys.pending(variant),
                keys.job_channel(request_id),
                keys.running(variant),
            ],
            args=[
                token,
                repr(now + lease_seconds),
                repr(now),
                max_attempts,
                request_id,
                worker,
                variant,
                first_line,
            ],
        )
        outcome = cast(ClaimOutcome, reply[0])
        flags = reply[1:] if outcome == "claimed" else ["", "", "0", ""]
        count, watched = int(flags[2]), flags[3] == "1"
        if outcome == "claimed" and sole_log_writer:
            self._log_next[request_id] = count
            if watched:
                self._watched.add(request_id)
        return Claim(
            outcome,
            now,
            cancel_requested=flags[0] == "1",
            run_alone=flags[1] == "1",
            watched=watched,
            log_count=count,
        )

    def renew(self, request_id: str, variant: str, token: str, lease_seconds: float) -> bool:
        """Push the lease of a job this run holds `lease_seconds` on; False when it holds it no more."""
        return bool(
            self._renew(
                keys=[keys.job(request_id), keys.running(variant)],
                args=[token, repr(time.time() + lease_seconds), request_id],
            )
        )

    def requeue(self, request_id: str, variant: str, token: str, *, refund_attempt: bool) -> bool:
        """Give a running job back to the queue (it will be retried); `refund_attempt` when the failure
        was not the job's doing (an outage), so it does not count towards `max_attempts`."""
        self._log_next.pop(request_id, None)  # lines after this are not the holder's to number
        self._watched.discard(request_id)
        requeued = bool(
            self._requeue(
                keys=[keys.job(request_id), keys.pending(variant), keys.running(variant)],
                args=[token, request_id, "1" if refund_attempt else "0", 0],
            )
        )
        if requeued:
            self.notify(request_id, variant)
        return requeued

    def complete(
        self,
        request_id: str,
        *,
        token: str = "",
        result: dict,
        result_code: int = 200,
        error: str | None = None,
        error_type: str | None = None,
        inference_time: float | None = None,
        extra: dict | None = None,
        variant: str | None = None,
        logs: list[str] | None = None,
        webhook_due: float | None = None,
        report: RunReport | None = None,
    ) -> Completed | None:
        """Record the outcome (fal's cancelled one instead if a cancel was requested while the job ran); a
        Completed only for the one call that completed the job (None otherwise).
        `variant` (else read from the record), `logs` (`log_entry` lines appended with it), `webhook_due`
        (book the first webhook attempt at this time) and `report` (a worker's completions-stream entry)
        ride along in the same round trip, which also takes the job out of its running set."""
        self._log_next.pop(request_id, None)  # the completion numbers its lines from the record's count
        self._watched.discard(request_id)
        if variant is None:
            variant = (
                cast(str | None, self.redis.hget(keys.job(request_id), "variant")) or ""
            )  # a decoding client
        completed_at = repr(time.time())
        fields: dict[str, str | int] = {
            "completed_at": completed_at,
            "result": json.dumps(result),
            "result_code": result_code,
            "error": error or "",
            "error_type": error_type or "",
            "inference_time": "" if inference_time is None else repr(inference_time),
            "extra": json.dumps(extra or {}),
        }
        flat = [item for pair in fields.items() for item in pair]
        lines = logs or []
        booking = keys.webhook_booking(request_id, 0) if webhook_due is not None else ""
        reported: list[str | int] = ["", "", "", 0]
        if report is not None:
            run = "" if report.run_seconds is None else f"{report.run_seconds:.4f}"
            reported = [report.outcome, report.worker, run, report.keep]
        reply = self._complete(
            keys=[
                keys.job(request_id),
                keys.pending(variant),
                keys.WEBHOOK_DUE,
                keys.job_channel(request_id),
                keys.WEBHOOK_READY,
                keys.running(variant),
                keys.COMPLETIONS,
            ],
            args=[
                token,
                request_id,
                self.record_ttl,
                booking,
                webhook_due or 0,
                completed_at,
                *reported,
                error_type or "",
                variant,
                len(lines),
                *lines,
                *flat,
            ],
        )
        if not reply:
            return None
        ended, created, started = reply
        cancelled = ended == 2
        return Completed(
            float(created) if created else None,
            float(started) if started else None,
            _CANCELLED.error_type if cancelled else error_type or "",
            cancelled,
        )

    def send_webhook(self, request_id: str, safety_due: float) -> None:
        """Hand attempt 0 of a completed job's webhook to the deliverers now, booked for `safety_due` in case
        the deliverer taking it dies (the completion script does the same for the jobs it ends)."""
        booking = keys.webhook_booking(request_id, 0)
        pipe = self.redis.pipeline(transaction=False)
        pipe.zadd(keys.WEBHOOK_DUE, {booking: safety_due}, nx=True)
        pipe.lpush(keys.WEBHOOK_READY, booking)
        pipe.execute()

    def cancel(self, request_id: str) -> CancelOutcome:
        record = self.get(request_id)
        if record is None:
            return "not_found"
        cancelled = RequestCancelled()
        fields: dict[str, str | int] = {
            "completed_at": repr(time.time()),
            "result": json.dumps(cancelled.body()),
            "result_code": cancelled.status_code,
            "error": cancelled.message,
            "error_type": cancelled.error_type,
        }
        flat = [item for pair in fields.items() for item in pair]
        outcome = self._cancel(
            keys=[keys.job(request_id), keys.pending(record.spec.variant)],
            args=[request_id, self.record_ttl, *flat],
        )
        if outcome in ("cancelled", "requested"):
            self.notify(request_id, record.spec.variant if outcome == "cancelled" else None)
        return outcome

    def cancel_requested(self, request_id: str) -> bool:
        return self.redis.hget(keys.job(request_id), "cancel_requested") == "1"

    # --- failed runs: the last error, dead letters, and a fresh start by ops ---
    def note_error(
        self, request_id: str, message: str, error_type: str = "", *, run_alone: bool = False
    ) -> None:
        """Keep a failed run's error on the record (the message of the final failure once attempts run
        out); `run_alone`: the next run takes a forward by itself."""
        fields: dict[FieldT, EncodableT] = {"last_error": message[:500], "last_error_type": error_type}
        if run_alone:
            fields["run_alone"] = "1"
        self.redis.hset(keys.job(request_id), mapping=fields)

    def last_error(self, request_id: str) -> tuple[str | None, str | None]:
        """(message, error type) noted by the last failed run."""
        last, last_type = cast(
            list[str | None], self.redis.hmget(keys.job(request_id), ["last_error", "last_error_type"])
        )  # decoding client
        return last, last_type

    def dead_letter(self, request_id: str) -> None:
        """List a job whose attempts ran out (ops lists and requeues them)."""
        self.redis.zadd(keys.DEADLETTER, {request_id: time.time()})

    def restart_failed(self, request_id: str, *, webhook_attempts: int) -> Restart:
        """Give a dead-lettered (or otherwise failed) job a fresh start: IN_QUEUE, attempts 0, queued
        again, its webhook bookings and recorded attempts (up to `webhook_attempts` of them) cleared so
        the new outcome is delivered. Only the record changes: the caller sends the returned spec to the
        broker."""
        key = keys.job(request_id)
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    record = self.get(request_id)
                    if record is None:
                        return Restart(None)
                    dead = self.redis.zscore(keys.DEADLETTER, request_id) is not None
                    if record.status != Status.COMPLETED or (record.error is None and not dead):
                        return Restart(record, dead)
                    # A start deadline set at submission has long passed; the retry must not time out at once.
                    spec = record.spec.model_copy(update={"start_deadline": None})
                    score = keys.queue_score(time.time(), spec.priority)
                    pipe.multi()
                    attempts = range(webhook_attempts)
                    pipe.hdel(
                        key,
                        *_RESET_FIELDS,
                        keys.WEBHOOK_ATTEMPT_COUNT_FIELD,
                        *[keys.webhook_attempt_field(n) for n in attempts],
                    )
                    # (a record written before the webhook fields existed gets them)
                    fresh: dict[FieldT, EncodableT] = {
                        "status": Status.IN_QUEUE,
                        "attempts": 0,
                        "spec": spec.model_dump_json(),
                    }
                    for name, value in webhook_fields(spec).items():
                        fresh[name] = value
                    pipe.hset(key, mapping=fresh)
                    pipe.persist(key)  # waiting again: no TTL until it ends
                    pipe.zadd(keys.pending(spec.variant), {request_id: score})
                    self.notify(request_id, spec.variant, pipe)
                    pipe.zrem(keys.DEADLETTER, request_id)
                    pipe.zrem(keys.WEBHOOK_FAILED, request_id)
                    pipe.zrem(keys.WEBHOOK_DUE, *[keys.webhook_booking(request_id, n) for n in attempts])
                    pipe.delete(*[keys.webhook_try(request_id, n) for n in attempts])
                    pipe.execute()
                    return Restart(record, dead, spec)
                except redis.WatchError:
                    continue

    # --- schedules (sorted sets scored by due time) ---
    def pop_due(self, key: str, limit: int = 100) -> list[str]:
        """Members of a schedule whose time has come, removed atomically: each goes to one caller."""
        return self._pop_due(keys=[key], args=[time.time(), limit])

    # --- S3 event de-duplication ---
    def job_for_object(self, object_fingerprint: str, request_id: str) -> str:
        """The job id for an input object version: the first caller's id wins."""
        key = keys.object_job(object_fingerprint)
        self.redis.set(key, request_id, nx=True, ex=self.record_ttl)
        return cast(str | None, self.redis.get(key)) or request_id  # a decoding client: str replies
