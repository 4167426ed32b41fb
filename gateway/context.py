"""What one gateway process holds: settings, Redis clients, the Celery sender, S3, keys and signers."""

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
from common.state.shards import refuse_shards
from gateway.push import JobEvents


@dataclass
class Gateway:
    settings: GatewaySettings
    store: JobStore  # sync: Lua state changes, run in the thread pool
    aredis: aioredis.Redis  # async: the hot read paths (status, result, streams)
    celery: Celery
    objects: ObjectStore
    keys: KeyRing
    signer: WebhookSigner
    status_script: AsyncScript | None = None  # registered on first use (records.py)

    @classmethod
    def build(cls, settings: GatewaySettings) -> Gateway:
        check_secrets(settings)  # a deployment never signs with keys anyone reaching Redis can read
        refuse_shards(settings, "the gateway")
        store = JobStore.from_settings(settings)
        return cls(
            settings=settings,
            store=store,
            aredis=async_redis_client(settings),
            celery=make_celery(settings, name="birefnet-gateway"),
            objects=ObjectStore(settings),
            keys=KeyRing(settings.gateway_api_keys),
            signer=webhook_signer(settings.webhook_signing_keys, store.redis),
        )

    @property
    def redis(self) -> redis.Redis:
        return self.store.redis

    @cached_property
    def limiter(self) -> Limiter:
        """Per-key limits and queue caps (shared by all gateway processes through Redis)."""
        return Limiter(self.store.redis, self.settings)

    @cached_property
    def fetch_policy(self) -> NetPolicy:
        """Where image URLs may point (the workers enforce the same at connect time)."""
        return NetPolicy.from_settings(self.settings)

    @cached_property
    def events(self) -> JobEvents:
        """Pushed job changes for status streams and sync runs (one subscription per process)."""
        return JobEvents(self.aredis, recheck=self.settings.gateway_push_recheck,
                         fallback_poll=self.settings.gateway_push_fallback_poll)

    @cached_property
    def secret(self) -> str:
        """HMAC secret for gateway-served URLs and upload tokens."""
        return gateway_signing_secret(self.settings.gateway_signing_secret, self.store.redis)

    async def close(self) -> None:
        if "events" in self.__dict__:
            await self.events.close()
        await self.aredis.aclose()
        self.store.redis.close()


def gateway(request: Request) -> Gateway:
    return request.app.state.gateway
