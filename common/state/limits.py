"""Per-key limits and queue caps, checked by one Lua script in Redis so every gateway process shares them.

The queue cap counts the variant's IN_QUEUE set; `requests_per_minute` keeps a sliding 60 s log;
`max_concurrent` prunes its set against the job records on every check (a COMPLETED job, or a record that
never appeared within a grace period, frees its slot), so a gateway that crashes between admitting and
answering leaks nothing. Refused requests are not counted; time is Redis's own (TIME), so gateways agree.

Both budgets count units: an image is one; a video ceil(duration / video_limit_unit_seconds), admitted with
all of them when the gateway knows its duration (an inline video), else with one and charged the rest by the
worker that opens it (`charge`). n units are n members, `<request id>`, `<request id>#2` ... `#n`, which age
out of the rate log and are freed with the request's COMPLETED record like any other. Its segments are paid
for by the video's units: they never pass admission, so none is refused half-way.

With Redis shards a key's state stays on shard 0 (one rate log and one concurrency set per key, whichever
variants its requests use), while a queue and its job records live on their variant's shard: the cap of a
queue elsewhere is read there before the script (not atomic with it, so concurrent submits may pass a cap
by a few), and the concurrency set's members of other shards (version-8 request ids, which shard 0 never
issues) are pruned against their own shard's records by the caller, not by the script.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Literal, cast

import redis

from common.domain.errors import LimitRefused
from common.domain.status import Status
from common.settings import AdmissionSettings
from common.state import keys

Reason = Literal["queue_full", "rate_limited", "concurrency_limit"]
NO_CAP = -1
UNADMITTED_GRACE = 60  # s a slot stays taken for a request whose job record has not appeared (yet)

# Shared by both scripts. A request holding n units is n members: `<id>`, `<id>#2` ... `<id>#n`.
# prune_active frees the slots of requests that ended (or never got a record); rate_full and active_full say
# whether `units` more fit (a retry-after, or -1 when they never can).
_COMMON = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local function member(rid, k) if k == 1 then return rid end return rid .. '#' .. k end
local function add_units(key, rid, from, to, ttl)
  for k = from, to do redis.call('ZADD', key, now, member(rid, k)) end
  redis.call('EXPIRE', key, ttl)
end
local function drop_units(key, rid, to)
  for k = 1, to do redis.call('ZREM', key, member(rid, k)) end
end
local function prune_active(key, job_prefix, grace)
  local members = redis.call('ZRANGE', key, 0, -1, 'WITHSCORES')
  for i = 1, #members, 2 do
    if string.sub(members[i], 15, 15) ~= '8' then  -- version-8 ids live on other shards: pruned by the caller
      local status = redis.call('HGET', job_prefix .. string.match(members[i], '^[^#]+'), 'status')
      if status == 'COMPLETED' or ((not status) and now - tonumber(members[i + 1]) > grace) then
        redis.call('ZREM', key, members[i])
      end
    end
  end
end
local function rate_full(key, rpm, units, total)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - 60)
  local used = redis.call('ZCARD', key)
  if used + units <= rpm then return nil end
  if total > rpm then return -1 end
  local oldest = redis.call('ZRANGE', key, used + units - rpm - 1, used + units - rpm - 1, 'WITHSCORES')
  return math.max(1, math.ceil(tonumber(oldest[2] or now) + 60 - now))
end
local function active_full(key, maxc, units, total, job_prefix, grace)
  prune_active(key, job_prefix, grace)
  if redis.call('ZCARD', key) + units <= maxc then return nil end
  if total > maxc then return -1 end
  return 1
end
"""

# Admission: `units` (ARGV[9]) for this request, its length known (1 for an image, or a video not probed).
_ADMIT = (
    _COMMON
    + """
local rpm, maxc, cap, units = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[9])
local rid = ARGV[4]
if cap >= 0 and redis.call('ZCARD', KEYS[3]) >= cap then return {'queue_full', ARGV[8]} end
if rpm > 0 then
  local retry = rate_full(KEYS[1], rpm, units, units)
  if retry then return {'rate_limited', tostring(retry)} end
end
if maxc > 0 then
  local retry = active_full(KEYS[2], maxc, units, units, ARGV[5], tonumber(ARGV[6]))
  if retry then return {'concurrency_limit', tostring(retry)} end
  add_units(KEYS[2], rid, 1, units, ARGV[7])
end
if rpm > 0 then add_units(KEYS[1], rid, 1, units, 61) end
return {'ok', '0'}
"""
)

# A video's units beyond those it was admitted with (ARGV[8] held, ARGV[4] in all), charged when a worker
# has opened it; once only (KEYS[3] remembers it for the job record's lifetime, so a rerun after a lost
# worker is not charged again). Over a budget: nothing is added and the units it held are taken back (a
# refused request is not
# counted).
_CHARGE = (
    _COMMON
    + """
local rpm, maxc, rid = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local units, held = tonumber(ARGV[4]), tonumber(ARGV[8])
if redis.call('EXISTS', KEYS[3]) == 1 then return {'ok', '0'} end
local extra = units - held
local function refuse(reason, retry)
  drop_units(KEYS[1], rid, held)
  drop_units(KEYS[2], rid, held)
  return {reason, tostring(retry)}
end
if rpm > 0 then
  local retry = rate_full(KEYS[1], rpm, extra, units)
  if retry then return refuse('rate_limited', retry) end
end
if maxc > 0 then
  local retry = active_full(KEYS[2], maxc, extra, units, ARGV[5], tonumber(ARGV[6]))
  if retry then return refuse('concurrency_limit', retry) end
  add_units(KEYS[2], rid, held + 1, units, ARGV[7])
end
if rpm > 0 then add_units(KEYS[1], rid, held + 1, units, 61) end
redis.call('SET', KEYS[3], units, 'EX', ARGV[7])
return {'ok', '0'}
"""
)

MESSAGES: dict[Reason, str] = {
    "queue_full": "The queue for this model is full; retry later",
    "rate_limited": "Too many requests for this API key (requests_per_minute); retry later",
    "concurrency_limit": "Too many requests of this API key are queued or running (max_concurrent); retry "
    "when one completes",
}


def video_units(duration: float, unit_seconds: float) -> int:
    """What a video of `duration` seconds costs in a key's budgets (an image costs 1)."""
    return max(1, math.ceil(duration / unit_seconds - 1e-9))


def admitted_units(extra: dict) -> int:
    """The units a job is admitted with (JobSpec.extra['limits']['units']: a video whose length the gateway
    knew at submit; otherwise one)."""
    return int((extra.get("limits") or {}).get("units") or 1)


def queue_cap(settings: AdmissionSettings, variant: str, requested: int | None = None) -> int:
    """The most IN_QUEUE requests `variant` may hold for this submit (NO_CAP: unlimited)."""
    configured = settings.max_queue_depth_per_variant.get(variant, settings.max_queue_depth)
    caps = [c for c in (configured or None, requested) if c is not None]
    return min(caps) if caps else NO_CAP


class QueueFull(Exception):
    """A variant's queue is at its cap: the event that would add to it is to be kept and tried again."""

    def __init__(self, variant: str, retry_after: int):
        super().__init__(f"the queue of {variant} is full")
        self.variant, self.retry_after = variant, retry_after


Route = Callable[[str], redis.Redis]


class Limiter:
    def __init__(
        self,
        client: redis.Redis,
        settings: AdmissionSettings,
        *,
        queues: Route | None = None,
        records: Route | None = None,
    ):
        """`client`: where keys' limits live. With shards, `queues` gives a variant's Redis and `records` a
        request id's (default: `client` for both)."""
        self.redis = client
        self.settings = settings
        self.queues: Route = queues or (lambda _variant: client)
        self.records: Route = records or (lambda _request_id: client)
        self._sharded = records is not None
        self._admit = client.register_script(_ADMIT)
        self._charge = client.register_script(_CHARGE)

    def admit(
        self,
        *,
        key_id: str,
        request_id: str,
        variant: str | None,
        max_concurrent: int | None = None,
        requests_per_minute: int | None = None,
        max_queue_length: int | None = None,
        units: int = 1,
    ) -> LimitRefused | None:
        """None when the request may be enqueued (and is now counted, `units` units); else why not. `variant`
        None: the request will not wait in a queue (rejected input), so no queue cap applies."""
        cap = NO_CAP if variant is None else queue_cap(self.settings, variant, max_queue_length)
        if cap == NO_CAP and not max_concurrent and not requests_per_minute:
            return None  # nothing to check: no round trip
        if variant is not None and cap != NO_CAP and self.queues(variant) is not self.redis:
            if self.queues(variant).zcard(keys.pending(variant)) >= cap:
                return LimitRefused(
                    MESSAGES["queue_full"], "queue_full", self.settings.queue_full_retry_after
                )
            cap = NO_CAP  # checked on its own shard
        if max_concurrent and self._sharded:
            self._prune_elsewhere(key_id)
        reason, retry_after = self._admit(
            keys=[keys.rate_limit(key_id), keys.active_limit(key_id), keys.pending(variant or "")],
            args=[
                requests_per_minute or 0,
                max_concurrent or 0,
                cap,
                request_id,
                keys.JOB_PREFIX,
                UNADMITTED_GRACE,
                self.settings.job_record_ttl,
                self.settings.queue_full_retry_after,
                units,
            ],
        )
        if reason == "ok":
            return None
        if units > 1 and reason != "queue_full":
            return self._video_refusal(reason, int(retry_after), units, max_concurrent, requests_per_minute)
        return LimitRefused(MESSAGES[reason], reason, int(retry_after))

    def charge(
        self,
        *,
        key_id: str,
        request_id: str,
        units: int,
        held: int = 1,
        max_concurrent: int | None = None,
        requests_per_minute: int | None = None,
    ) -> LimitRefused | None:
        """Charge an admitted request holding `held` units `units` in all: None when charged (or charged
        before, or nothing more to charge), else why not; a refused request no longer counts against the
        key."""
        if units <= held or not (max_concurrent or requests_per_minute):
            return None
        if max_concurrent and self._sharded:
            self._prune_elsewhere(key_id)
        reason, retry_after = self._charge(
            keys=[keys.rate_limit(key_id), keys.active_limit(key_id), keys.limit_charge(request_id)],
            args=[
                requests_per_minute or 0,
                max_concurrent or 0,
                request_id,
                units,
                keys.JOB_PREFIX,
                UNADMITTED_GRACE,
                self.settings.job_record_ttl,
                held,
            ],
        )
        if reason == "ok":
            return None
        return self._video_refusal(reason, int(retry_after), units, max_concurrent, requests_per_minute)

    def _video_refusal(
        self,
        reason: Reason,
        retry_after: int,
        units: int,
        max_concurrent: int | None,
        requests_per_minute: int | None,
    ) -> LimitRefused:
        """fal's 429 for a video over a budget: what it costs, the budget, and whether it can ever fit
        (retry_after -1: longer than the whole budget)."""
        name, budget = (
            ("requests_per_minute", requests_per_minute)
            if reason == "rate_limited"
            else ("max_concurrent", max_concurrent)
        )
        message = (
            f"This video costs {units} units (one per {self.settings.video_limit_unit_seconds:g} s) and "
            f"this API key's {name} is {budget}"
            + ("; it can never fit: send a shorter video" if retry_after < 0 else "; retry later")
        )
        return LimitRefused(message, reason, retry_after if retry_after > 0 else 60)

    def _prune_elsewhere(self, key_id: str) -> None:
        """Free the concurrency slots of `key_id`'s requests on other shards that completed (or never got a
        record), as the script does for shard 0's own. A video's extra units (`<id>#k`) go with its id."""
        active = keys.active_limit(key_id)
        members = cast(list[tuple[str, float]], self.redis.zrange(active, 0, -1, withscores=True))
        now, done = time.time(), []
        for member, since in members:
            request_id = member.split("#", 1)[0]
            client = self.records(request_id)
            if client is self.redis:
                continue
            status = client.hget(keys.job(request_id), "status")
            if status == Status.COMPLETED or (status is None and now - since > UNADMITTED_GRACE):
                done.append(member)
        if done:
            self.redis.zrem(active, *done)

    def queue_has_room(self, variant: str) -> bool:
        """Whether `variant`'s queue is under its configured cap (S3 events wait in SQS while it is not)."""
        cap = queue_cap(self.settings, variant)
        return cap == NO_CAP or self.queues(variant).zcard(keys.pending(variant)) < cap
