"""Shards: groups of variants on separate Redis deployments, each with its own queues and job records.

One Redis core carries a few hundred jobs a second; past that, variants are split across Redis
deployments (plain Redis, or Sentinel) configured in `redis_shards`. Shard 0 is `redis_url` and holds every
variant no shard names. Each shard is a whole deployment of its own: its Celery queues, job records,
webhook schedule, ops state. Nothing spans shards, so a job's every Redis call goes to one place.

Celery's Redis transport does not speak Redis Cluster (its queues are lists moved between keys, and
MULTI/EXEC and the scripts here touch several keys at once), so shards are chosen by variant instead of by
hashing keys: a variant's queue, its records and its workers stay together.

A request id tells which shard holds it while staying a UUID, as fal's clients expect (they treat ids as
opaque strings): shard 0 ids are random UUIDs (version 4, as always), shard n > 0 ids are version-8 UUIDs
whose first byte is n. Ids issued before sharding stay on shard 0. Shards are numbered by their place in
`redis_shards`, so the list may only grow at its end.

Routing lives here and only here: `ShardMap.for_variant` (submitting: the gateway and the S3-event
producer), `ShardMap.for_request` (status, result, cancel, logs), `settings_for` (a process serving one
shard: a worker, a deliverer, an ops view). What belongs to no variant (per-key limits, secrets, the
sequencer of an S3 key) stays on shard 0.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import TypeVar

from common.settings import RedisSettings

S = TypeVar("S", bound=RedisSettings)

MAX_SHARDS = 255  # the first byte of an id


@dataclass(frozen=True)
class Shard:
    index: int
    url: str
    variants: frozenset[str]  # empty for shard 0: every variant no other shard names
    sentinel_master: str = ""

    @property
    def name(self) -> str:
        return f"shard-{self.index}"


class ShardMap:
    def __init__(self, shards: list[Shard]):
        if not shards or shards[0].index != 0:
            raise ValueError("shard 0 (redis_url) comes first")
        self.shards = shards
        self._by_variant: dict[str, Shard] = {}
        for shard in shards[1:]:
            for variant in shard.variants:
                if variant in self._by_variant:
                    raise ValueError(f"variant {variant!r} is in two Redis shards")
                self._by_variant[variant] = shard

    @classmethod
    def from_settings(cls, settings: RedisSettings) -> ShardMap:
        if len(settings.redis_shards) > MAX_SHARDS:
            raise ValueError(f"at most {MAX_SHARDS} Redis shards")
        shards = [Shard(0, settings.redis_url, frozenset(), settings.redis_sentinel_master)]
        shards += [
            Shard(
                n, spec.url, frozenset(spec.variants), spec.sentinel_master or settings.redis_sentinel_master
            )
            for n, spec in enumerate(settings.redis_shards, start=1)
        ]
        return cls(shards)

    @property
    def sharded(self) -> bool:
        return len(self.shards) > 1

    def for_variant(self, variant: str) -> Shard:
        return self._by_variant.get(variant, self.shards[0])

    def for_request(self, request_id: str) -> Shard:
        """The shard a request id was issued on (shard 0 for ids this map does not know)."""
        index = shard_index(request_id)
        return self.shards[index] if index < len(self.shards) else self.shards[0]

    def for_variants(self, variants: list[str]) -> Shard:
        """The one shard serving all of `variants` (a worker's): a worker consumes from one Redis."""
        found = {self.for_variant(v).index for v in variants}
        if len(found) > 1:
            raise ValueError(
                f"variants {sorted(variants)} live on different Redis shards {sorted(found)}; "
                "run one worker per shard"
            )
        return self.shards[found.pop() if found else 0]

    def new_request_id(self, variant: str) -> str:
        return request_id_on(self.for_variant(variant).index)


def request_id_on(index: int) -> str:
    """A fresh request id that names shard `index`."""
    if index == 0:
        return str(uuid.uuid4())
    raw = bytearray(uuid.uuid4().bytes)
    raw[0] = index
    raw[6] = (raw[6] & 0x0F) | 0x80  # version 8: custom layout
    return str(uuid.UUID(bytes=bytes(raw)))  # uuid4's bytes already carry the RFC 4122 variant bits


def shard_index(request_id: str) -> int:
    """The shard a request id names: 0 unless it is a version-8 UUID (then its first byte)."""
    try:
        parsed = uuid.UUID(request_id)
    except ValueError:
        return 0
    return parsed.bytes[0] if parsed.version == 8 else 0


def settings_for(settings: S, shard: Shard) -> S:
    """`settings` for a process that talks to `shard` only: its Redis as redis_url (credentials, TLS and
    the other Redis options are shared by all shards)."""
    return settings.model_copy(
        update={"redis_url": shard.url, "redis_sentinel_master": shard.sentinel_master, "redis_shards": []}
    )
