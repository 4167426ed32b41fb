"""Secrets a development stack runs without configuring: generated once by whichever process needs them
first, then shared through Redis with every other process (check_secrets refuses this outside development)."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterable

import redis

from common.domain.signing import WebhookSigner, new_seed
from common.state import keys

log = logging.getLogger(__name__)


def _shared(client: redis.Redis, key: str, fresh: str) -> tuple[str, bool]:
    """The value stored at `key`, storing `fresh` there first if there is none; and whether it was stored."""
    stored_now = bool(client.set(key, fresh, nx=True))
    value = client.get(key)
    return (value.decode() if isinstance(value, bytes) else str(value)), stored_now


def webhook_signer(configured: Iterable[str], client: redis.Redis) -> WebhookSigner:
    """A signer of the configured keys, else of the development key kept in Redis."""
    texts = [text for text in configured if text.strip()]
    if texts:
        return WebhookSigner.from_keys(texts)
    seed, generated = _shared(client, keys.WEBHOOK_SIGNING_KEY, new_seed())
    if generated:
        log.warning("no webhook_signing_keys configured: generated one and stored it in Redis (dev only)")
    return WebhookSigner.from_keys([seed])


def gateway_signing_secret(configured: str, client: redis.Redis) -> str:
    """The HMAC secret of gateway-served URLs and upload tokens: the configured one, else the generated
    one."""
    if configured:
        return configured
    return _shared(client, keys.GATEWAY_SIGNING_SECRET, secrets.token_urlsafe(32))[0]
