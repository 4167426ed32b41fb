"""What one gateway process holds: settings, a set of Redis clients per shard, S3, keys and signers.

With `redis_shards`, each variant's jobs live on its shard (common/state/shards.py): a submit goes to the
shard of its variant, and every read or change of a request goes to the shard its id names. What belongs
to no variant stays on shard 0 (`redis_url`): per-key limits (a key's requests span variants, so its
rate log and concurrency set must be one), the auth throttle, the URL-signing secret, the webhook signing
keys and the deletion schedule of uploads.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import redis
import redis.asyncio as aioredis
from celery import Celery
from fastapi import Request
from redis.commands.core import AsyncScript

from common.adapters.netguard import NetPolicy
from common.adapters.queue import make_celery
from common.adapters.redis_conn import async_redis_client
from common.adapters.storage import ObjectStore
from common.domain.auth import KeyRing
from common.domain.signing import WebhookSigner
from common.settings import GatewaySettings, check_secrets
from common.state.dev_secrets import gateway_signing_secret, webhook_signer
from common.state.jobs import JobStore
from common.state.limits import Limiter
from common.state.shards import Shard, ShardMap, settings_for
from gateway.push import JobEvents


@dataclass
class ShardClients:
    """The gateway's clients of one Redis shard: its job records, queues and job events."""

    shard: Shard
    settings: GatewaySettings  # the gateway's, with this shard's Redis as redis_url
    store: JobStore  # sync: Lua state changes, run in the thread pool
    aredis: aioredis.Redis  # async: the hot read paths (status, result, streams)
    celery: Celery
    status_script: AsyncScript | None = None  # registered on first use (records.py)

    @classmethod
    def build(cls, settings: GatewaySettings, shard: Shard, sharded: bool) -> ShardClients:
        own = settings_for(settings, shard) if sharded else settings
        return cls(
            shard=shard,
            settings=own,
            store=JobStore.from_settings(own),
            aredis=async_redis_client(own),
            celery=make_celery(own, name="birefnet-gateway"),
        )

    @property
    def redis(self) -> redis.Redis:
        return self.store.redis

    @cached_property
    def events(self) -> JobEvents:
        """Pushed job changes for status streams and sync runs (one subscription per process and shard)."""
        return JobEvents(
            self.aredis,
            recheck=self.settings.gateway_push_recheck,
            fallback_poll=self.settings.gateway_push_fallback_poll,
        )

    async def close(self) -> None:
        if "events" in self.__dict__:
            await self.events.close()
        await self.aredis.aclose()
        self.store.redis.close()


@dataclass
class Gateway:
    settings: GatewaySettings
    shard_map: ShardMap
    shards: list[ShardClients]  # by shard index; shard 0 is redis_url
    objects: ObjectStore
    keys: KeyRing
    signer: WebhookSigner

    @classmethod
    def build(cls, settings: GatewaySettings) -> Gateway:
        check_secrets(settings)  # a deployment never signs with keys anyone reaching Redis can read
        shard_map = ShardMap.from_settings(settings)
        shards = [ShardClients.build(settings, shard, shard_map.sharded) for shard in shard_map.shards]
        return cls(
            settings=settings,
            shard_map=shard_map,
            shards=shards,
            objects=ObjectStore(settings),
            keys=KeyRing(settings.gateway_api_keys),
            signer=webhook_signer(settings.webhook_signing_keys, shards[0].redis),
        )

    def on_request(self, request_id: str) -> ShardClients:
        """The shard holding `request_id` (named by the id itself)."""
        return self.shards[self.shard_map.for_request(request_id).index]

    def on_variant(self, variant: str) -> ShardClients:
        """The shard holding `variant`'s queue and jobs."""
        return self.shards[self.shard_map.for_variant(variant).index]

    def new_request_id(self, variant: str) -> str:
        return self.shard_map.new_request_id(variant)

    # Shard 0: what belongs to no variant (limits, throttle, secrets, uploads' schedule).
    @property
    def store(self) -> JobStore:
        return self.shards[0].store

    @property
    def redis(self) -> redis.Redis:
        return self.shards[0].redis

    @property
    def aredis(self) -> aioredis.Redis:
        return self.shards[0].aredis

    @cached_property
    def limiter(self) -> Limiter:
        """Per-key limits and queue caps (shared by all gateway processes through Redis): the key's state on
        shard 0, each queue's cap read on its own shard."""
        if not self.shard_map.sharded:
            return Limiter(self.redis, self.settings)
        return Limiter(
            self.redis,
            self.settings,
            queues=lambda variant: self.on_variant(variant).redis,
            records=lambda request_id: self.on_request(request_id).redis,
        )

    @cached_property
    def fetch_policy(self) -> NetPolicy:
        """Where image URLs may point (the workers enforce the same at connect time)."""
        return NetPolicy.from_settings(self.settings)

    @cached_property
    def secret(self) -> str:
        """HMAC secret for gateway-served URLs and upload tokens."""
        return gateway_signing_secret(self.settings.gateway_signing_secret, self.redis)

    async def close(self) -> None:
        for shard in self.shards:
            await shard.close()


def gateway(request: Request) -> Gateway:
    return request.app.state.gateway
