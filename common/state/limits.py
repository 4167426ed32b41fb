"""Per-key limits and queue caps, checked by one Lua script in Redis so every gateway process shares them.

The queue cap counts the variant's IN_QUEUE set; `requests_per_minute` keeps a sliding 60 s log;
`max_concurrent` prunes its set against the job records on every check (a COMPLETED job, or a record that
never appeared within a grace period, frees its slot), so a gateway that crashes between admitting and
answering leaks nothing. Refused requests are not counted; time is Redis's own (TIME), so gateways agree.

Both budgets count units: a request is one unit when admitted; a video, once a worker has opened it and
knows its duration, is charged the rest of its ceil(duration / video_limit_unit_seconds) units (`charge`)
as members `<request id>#2` ... `#n` beside its own, which age out of the rate log and are freed with the
request's COMPLETED record like any other member. Its segments are paid for by that charge: they never pass
admission, so none is refused half-way.
"""

from __future__ import annotations

import math
from typing import Literal

import redis

from common.domain.errors import LimitRefused
from common.settings import Settings
from common.state import keys

Reason = Literal["queue_full", "rate_limited", "concurrency_limit"]
NO_CAP = -1
UNADMITTED_GRACE = 60  # s a slot stays taken for a request whose job record has not appeared (yet)

# Frees the slots of requests that ended (or never got a record): a member `<id>#k` is one more unit of <id>.
_PRUNE_ACTIVE = """
local function prune_active(key, job_prefix, grace, now)
  local members = redis.call('ZRANGE', key, 0, -1, 'WITHSCORES')
  for i = 1, #members, 2 do
    local rid = string.match(members[i], '^[^#]+')
    local status = redis.call('HGET', job_prefix .. rid, 'status')
    if status == 'COMPLETED' or ((not status) and now - tonumber(members[i + 1]) > grace) then
      redis.call('ZREM', key, members[i])
    end
  end
end
"""

_ADMIT = _PRUNE_ACTIVE + """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local rpm, maxc, cap = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local rid = ARGV[4]
if cap >= 0 and redis.call('ZCARD', KEYS[3]) >= cap then return {'queue_full', ARGV[8]} end
if rpm > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 60)
  if redis.call('ZCARD', KEYS[1]) >= rpm then
    local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
    return {'rate_limited', tostring(math.max(1, math.ceil(tonumber(oldest[2]) + 60 - now)))}
  end
end
if maxc > 0 then
  prune_active(KEYS[2], ARGV[5], tonumber(ARGV[6]), now)
  if redis.call('ZCARD', KEYS[2]) >= maxc then return {'concurrency_limit', '1'} end
  redis.call('ZADD', KEYS[2], now, rid)
  redis.call('EXPIRE', KEYS[2], ARGV[7])
end
if rpm > 0 then
  redis.call('ZADD', KEYS[1], now, rid)
  redis.call('EXPIRE', KEYS[1], 61)
end
return {'ok', '0'}
"""

# A video's units beyond the one it was admitted with, charged once (the job record remembers it, so a
# rerun after a lost worker is not charged again). Over a budget: nothing is added and the request's own
# rate-log entry and slot are taken back (a refused request is not counted).
_CHARGE = _PRUNE_ACTIVE + """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local rpm, maxc, rid, extra = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
if redis.call('HGET', KEYS[3], 'limit_units') then return {'ok', '0'} end
local function refuse(reason, retry)
  redis.call('ZREM', KEYS[1], rid)
  redis.call('ZREM', KEYS[2], rid)
  return {reason, tostring(retry)}
end
if rpm > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 60)
  local used = redis.call('ZCARD', KEYS[1]) + (redis.call('ZSCORE', KEYS[1], rid) and 0 or 1)
  if used + extra > rpm then
    if 1 + extra > rpm then return refuse('rate_limited', -1) end
    local oldest = redis.call('ZRANGE', KEYS[1], used + extra - rpm - 1, used + extra - rpm - 1, 'WITHSCORES')
    return refuse('rate_limited', math.max(1, math.ceil(tonumber(oldest[2] or now) + 60 - now)))
  end
end
if maxc > 0 then
  prune_active(KEYS[2], ARGV[5], tonumber(ARGV[6]), now)
  local used = redis.call('ZCARD', KEYS[2]) + (redis.call('ZSCORE', KEYS[2], rid) and 0 or 1)
  if used + extra > maxc then return refuse('concurrency_limit', 1 + extra > maxc and -1 or 1) end
  for k = 2, extra + 1 do redis.call('ZADD', KEYS[2], now, rid .. '#' .. k) end
  redis.call('EXPIRE', KEYS[2], ARGV[7])
end
if rpm > 0 then
  for k = 2, extra + 1 do redis.call('ZADD', KEYS[1], now, rid .. '#' .. k) end
  redis.call('EXPIRE', KEYS[1], 61)
end
redis.call('HSET', KEYS[3], 'limit_units', extra + 1)
return {'ok', '0'}
"""

MESSAGES: dict[Reason, str] = {
    "queue_full": "The queue for this model is full; retry later",
    "rate_limited": "Too many requests for this API key (requests_per_minute); retry later",
    "concurrency_limit": "Too many requests of this API key are queued or running (max_concurrent); retry "
                         "when one completes",
}


def video_units(duration: float, unit_seconds: float) -> int:
    """What a video of `duration` seconds costs in a key's budgets (an image costs 1)."""
    return max(1, math.ceil(duration / unit_seconds - 1e-9))


def queue_cap(settings: Settings, variant: str, requested: int | None = None) -> int:
    """The most IN_QUEUE requests `variant` may hold for this submit (NO_CAP: unlimited)."""
    configured = settings.max_queue_depth_per_variant.get(variant, settings.max_queue_depth)
    caps = [c for c in (configured or None, requested) if c is not None]
    return min(caps) if caps else NO_CAP


class QueueFull(Exception):
    """A variant's queue is at its cap: the event that would add to it is to be kept and tried again."""

    def __init__(self, variant: str, retry_after: int):
        super().__init__(f"the queue of {variant} is full")
        self.variant, self.retry_after = variant, retry_after


class Limiter:
    def __init__(self, client: redis.Redis, settings: Settings):
        self.redis = client
        self.settings = settings
        self._admit = client.register_script(_ADMIT)
        self._charge = client.register_script(_CHARGE)

    def admit(self, *, key_id: str, request_id: str, variant: str | None, max_concurrent: int | None = None,
              requests_per_minute: int | None = None, max_queue_length: int | None = None) -> LimitRefused | None:
        """None when the request may be enqueued (and is now counted); else why not. `variant` None: the
        request will not wait in a queue (rejected input), so no queue cap applies."""
        cap = NO_CAP if variant is None else queue_cap(self.settings, variant, max_queue_length)
        if cap == NO_CAP and not max_concurrent and not requests_per_minute:
            return None  # nothing to check: no round trip
        reason, retry_after = self._admit(
            keys=[keys.rate_limit(key_id), keys.active_limit(key_id), keys.pending(variant or "")],
            args=[requests_per_minute or 0, max_concurrent or 0, cap, request_id, keys.JOB_PREFIX,
                  UNADMITTED_GRACE, self.settings.job_record_ttl, self.settings.queue_full_retry_after])
        return None if reason == "ok" else LimitRefused(MESSAGES[reason], reason, int(retry_after))

    def charge(self, *, key_id: str, request_id: str, units: int, max_concurrent: int | None = None,
               requests_per_minute: int | None = None) -> LimitRefused | None:
        """Charge an admitted request `units` in all (it holds one already): None when charged (or charged
        before), else why not; a refused request no longer counts against the key."""
        if units <= 1 or not (max_concurrent or requests_per_minute):
            return None
        reason, retry_after = self._charge(
            keys=[keys.rate_limit(key_id), keys.active_limit(key_id), keys.job(request_id)],
            args=[requests_per_minute or 0, max_concurrent or 0, request_id, units - 1, keys.JOB_PREFIX,
                  UNADMITTED_GRACE, self.settings.job_record_ttl])
        if reason == "ok":
            return None
        budget = requests_per_minute if reason == "rate_limited" else max_concurrent
        name = "requests_per_minute" if reason == "rate_limited" else "max_concurrent"
        never = int(retry_after) < 0
        message = (f"This video costs {units} units (one per {self.settings.video_limit_unit_seconds:g} s) and "
                   f"this API key's {name} is {budget}" + ("; it can never fit: send a shorter video"
                                                          if never else "; retry later"))
        return LimitRefused(message, reason, max(1, int(retry_after)))

    def queue_has_room(self, variant: str) -> bool:
        """Whether `variant`'s queue is under its configured cap (S3 events wait in SQS while it is not)."""
        cap = queue_cap(self.settings, variant)
        return cap == NO_CAP or self.redis.zcard(keys.pending(variant)) < cap
