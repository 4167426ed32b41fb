"""Per-key limits and queue caps, checked by one Lua script in Redis so every gateway process shares them.

The queue cap counts the variant's IN_QUEUE set; `requests_per_minute` keeps a sliding 60 s log;
`max_concurrent` prunes its set against the job records on every check (a COMPLETED job, or a record that
never appeared within a grace period, frees its slot), so a gateway that crashes between admitting and
answering leaks nothing. Refused requests are not counted; time is Redis's own (TIME), so gateways agree.

With Redis shards a key's state stays on shard 0 (one rate log and one concurrency set per key, whichever
variants its requests use), while a queue and its job records live on their variant's shard: the cap of a
queue elsewhere is read there before the script (not atomic with it, so concurrent submits may pass a cap
by a few), and the concurrency set's members of other shards (version-8 request ids, which shard 0 never
issues) are pruned against their own shard's records by the caller, not by the script.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal, cast

import redis

from common.domain.errors import LimitRefused
from common.domain.status import Status
from common.settings import Settings
from common.state import keys

Reason = Literal["queue_full", "rate_limited", "concurrency_limit"]
NO_CAP = -1
UNADMITTED_GRACE = 60  # s a slot stays taken for a request whose job record has not appeared (yet)

_ADMIT = """
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
  local members = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
  for i = 1, #members, 2 do
    if string.sub(members[i], 15, 15) ~= '8' then  -- version-8 ids live on other shards: pruned by the caller
      local status = redis.call('HGET', ARGV[5] .. members[i], 'status')
      if status == 'COMPLETED' or ((not status) and now - tonumber(members[i + 1]) > tonumber(ARGV[6])) then
        redis.call('ZREM', KEYS[2], members[i])
      end
    end
  end
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

MESSAGES: dict[Reason, str] = {
    "queue_full": "The queue for this model is full; retry later",
    "rate_limited": "Too many requests for this API key (requests_per_minute); retry later",
    "concurrency_limit": "Too many requests of this API key are queued or running (max_concurrent); retry "
                         "when one completes",
}


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


Route = Callable[[str], redis.Redis]


class Limiter:
    def __init__(self, client: redis.Redis, settings: Settings, *, queues: Route | None = None,
                 records: Route | None = None):
        """`client`: where keys' limits live. With shards, `queues` gives a variant's Redis and `records` a
        request id's (default: `client` for both)."""
        self.redis = client
        self.settings = settings
        self.queues: Route = queues or (lambda _variant: client)
        self.records: Route = records or (lambda _request_id: client)
        self._sharded = records is not None
        self._admit = client.register_script(_ADMIT)

    def admit(self, *, key_id: str, request_id: str, variant: str | None, max_concurrent: int | None = None,
              requests_per_minute: int | None = None, max_queue_length: int | None = None) -> LimitRefused | None:
        """None when the request may be enqueued (and is now counted); else why not. `variant` None: the
        request will not wait in a queue (rejected input), so no queue cap applies."""
        cap = NO_CAP if variant is None else queue_cap(self.settings, variant, max_queue_length)
        if cap == NO_CAP and not max_concurrent and not requests_per_minute:
            return None  # nothing to check: no round trip
        if variant is not None and cap != NO_CAP and self.queues(variant) is not self.redis:
            if self.queues(variant).zcard(keys.pending(variant)) >= cap:
                return LimitRefused(MESSAGES["queue_full"], "queue_full", self.settings.queue_full_retry_after)
            cap = NO_CAP  # checked on its own shard
        if max_concurrent and self._sharded:
            self._prune_elsewhere(key_id)
        reason, retry_after = self._admit(
            keys=[keys.rate_limit(key_id), keys.active_limit(key_id), keys.pending(variant or "")],
            args=[requests_per_minute or 0, max_concurrent or 0, cap, request_id, keys.JOB_PREFIX,
                  UNADMITTED_GRACE, self.settings.job_record_ttl, self.settings.queue_full_retry_after])
        return None if reason == "ok" else LimitRefused(MESSAGES[reason], reason, int(retry_after))

    def _prune_elsewhere(self, key_id: str) -> None:
        """Free the concurrency slots of `key_id`'s requests on other shards that completed (or never got a
        record), as the script does for shard 0's own."""
        active = keys.active_limit(key_id)
        members = cast(list[tuple[str, float]], self.redis.zrange(active, 0, -1, withscores=True))
        now, done = time.time(), []
        for request_id, since in members:
            client = self.records(request_id)
            if client is self.redis:
                continue
            status = client.hget(keys.job(request_id), "status")
            if status == Status.COMPLETED or (status is None and now - since > UNADMITTED_GRACE):
                done.append(request_id)
        if done:
            self.redis.zrem(active, *done)

    def queue_has_room(self, variant: str) -> bool:
        """Whether `variant`'s queue is under its configured cap (S3 events wait in SQS while it is not)."""
        cap = queue_cap(self.settings, variant)
        return cap == NO_CAP or self.queues(variant).zcard(keys.pending(variant)) < cap
