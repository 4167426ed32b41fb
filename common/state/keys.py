"""Every Redis key and pub/sub channel name of the project, in one place (kombu's own broker keys aside:
common.adapters.broker). The strings are stored data: changing one orphans what a deployment has written."""

from __future__ import annotations

PREFIX = "birefnet:"

# Queue position score of a low-priority job: added to its creation time (unix seconds), so every normal job
# ranks ahead of every low-priority one while each class stays first-in, first-out. (Scores written before
# they were times were a sequence number, plus this offset for low ones: smaller than a time, so such jobs
# keep their place ahead of newer ones of their class.)
LOW_PRIORITY_OFFSET = 10**12

# --- job records (common.state.jobs) ---
JOB_PREFIX = f"{PREFIX}job:"  # + request id: the record hash (Lua scripts append the id themselves)
PENDING_PREFIX = f"{PREFIX}pending:"  # + variant: the IN_QUEUE zset, scored by queue position


def job(request_id: str) -> str:
    return f"{JOB_PREFIX}{request_id}"


def logs(request_id: str) -> str:
    """The log list of a record written before log lines moved into the record (read as a fallback)."""
    return f"{JOB_PREFIX}{request_id}:logs"


# A job's log lines live in its record: field `log:<n>` holds line n, `log_count` how many there are.
LOG_COUNT_FIELD = "log_count"


def log_field(n: int) -> str:
    return f"log:{n}"


# A running job's lease has no key of its own: it is the job's score in its variant's running set (when it
# lapses, unix seconds; `running` below) and the record's `lease` field (the holder's token).


def pending(variant: str) -> str:
    return f"{PENDING_PREFIX}{variant}"


def unserved_noted(variant: str) -> str:  # waiting jobs already told no worker serves them (unserved)
    return f"{PREFIX}unserved-noted:{variant}"


def queue_score(created_at: float, priority: str) -> float:
    """A waiting job's score in its pending zset: its creation time, low-priority ones after all others."""
    return created_at + (LOW_PRIORITY_OFFSET if priority == "low" else 0)


# --- S3 intake de-duplication (producer.intake) ---
def object_job(object_fingerprint: str) -> str:  # the job id of an input object version
    return f"{PREFIX}object:{object_fingerprint}"


def key_sequence(digest: str) -> str:  # newest event sequencer handled for an unversioned key
    return f"{PREFIX}keyseq:{digest}"


def upload(digest: str) -> str:  # the job that ended an upload overwritten before it was read
    return f"{PREFIX}upload:{digest}"


# --- change events (pub/sub; gateway.push listens) ---
EVENTS_PREFIX = f"{PREFIX}events:"
EVENTS_PATTERN = f"{EVENTS_PREFIX}*"


def job_channel(request_id: str) -> str:
    """Every change of the job's record (a hint only); the message is the job's variant when the order of
    its queue changed with it (its queue's watchers wake too), else empty."""
    return f"{EVENTS_PREFIX}job:{request_id}"


# --- operational state (common.state.ops_state) ---
PAUSED = f"{PREFIX}paused"  # hash variant -> JSON
WORKERS = f"{PREFIX}workers"  # zset worker name -> last heartbeat
COMPLETIONS = f"{PREFIX}completions"  # stream, one entry per finished job
DEADLETTER = f"{PREFIX}deadletter"  # zset request id -> when its attempts ran out
HEARTBEAT_PREFIX = f"{PREFIX}worker:"
HEARTBEAT_PATTERN = f"{HEARTBEAT_PREFIX}*"


def heartbeat(worker_name: str) -> str:
    return f"{HEARTBEAT_PREFIX}{worker_name}"


def running(variant: str) -> str:  # zset request id -> when its lease lapses: the jobs workers run
    return f"{PREFIX}running:{variant}"


def orphan_scan(variant: str) -> str:  # lock: one worker at a time looks for running jobs whose worker died
    return f"{PREFIX}orphans:{variant}"


def orphan_queued_scan(variant: str) -> str:  # lock: the (rarer) look for waiting jobs whose message is gone
    return f"{PREFIX}orphans:queued:{variant}"


# --- admission limits (common.state.limits) and failed-auth throttle (gateway.throttle) ---
def rate_limit(key_id: str) -> str:
    return f"{PREFIX}limits:rate:{key_id}"


def active_limit(key_id: str) -> str:
    return f"{PREFIX}limits:active:{key_id}"


def limit_charge(request_id: str) -> str:
    """Set once a video's full units are charged (beside its key's limits, so on shard 0 with shards)."""
    return f"{PREFIX}limits:charged:{request_id}"


AUTH_FAIL_PREFIX = f"{PREFIX}gateway:authfail:"


def auth_fail_address(address: str) -> str:
    return f"{AUTH_FAIL_PREFIX}ip:{address}"


# --- gateway schedules (gateway.sweeper), zsets scored by due time ---
DEADLINES = f"{PREFIX}gateway:deadlines"  # request id -> start deadline (queued requests to expire)
OUTPUTS = f"{PREFIX}gateway:outputs"  # "req:<id>" / "obj:<key>" -> when its files are deleted

# --- kept masks (worker.masks) ---
MASK_CACHE_PREFIX = f"{PREFIX}maskcache:"


def mask_cache(digest: str) -> str:
    return f"{MASK_CACHE_PREFIX}{digest}"


# --- webhooks (common.state.webhooks) ---
WEBHOOK_DUE = f"{PREFIX}webhook:due"  # zset "<request id>|<attempt>" -> due time
WEBHOOK_FAILED = f"{PREFIX}webhook:failed"  # zset request id -> when retries ran out
# List of attempts to make now (the deliverers block on it): a booking ("<request id>|<attempt>"), or a
# completion's hand-off of attempt 0, a JSON object carrying what the attempt needs (common.state.webhooks).
WEBHOOK_READY = f"{PREFIX}webhook:ready"


# The delivery attempts made are fields of the job's record (its TTL covers them): a count, and one JSON
# entry per attempt number.
WEBHOOK_ATTEMPT_COUNT_FIELD = "webhook_attempts"
WEBHOOK_ATTEMPT_FIELD_PREFIX = "webhook_attempt:"


def webhook_attempt_field(attempt: int) -> str:  # a record field: attempt `attempt`'s outcome (JSON)
    return f"{WEBHOOK_ATTEMPT_FIELD_PREFIX}{attempt}"


def webhook_booking(request_id: str, attempt: int) -> str:  # a WEBHOOK_DUE member
    return f"{request_id}|{attempt}"


def webhook_try(request_id: str, attempt: int) -> str:  # taken by the one copy making the attempt
    return f"{PREFIX}webhook:{request_id}:try:{attempt}"


# --- generated secrets and the replication marker ---
GATEWAY_SIGNING_SECRET = f"{PREFIX}gateway-signing-secret"  # common.state.dev_secrets
WEBHOOK_SIGNING_KEY = f"{PREFIX}webhook-signing-key"  # common.state.dev_secrets
REPLICATED_MARKER = f"{PREFIX}replicated"  # common.adapters.redis_conn.wait_for_replicas
