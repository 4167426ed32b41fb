"""Ed25519 webhook signatures as fal makes them (docs/api.md#webhooks), and the JWKS that verifies them.

The first configured key signs; every configured key is published, so keys can be rotated. Without
configured keys, common.state.dev_secrets supplies one generated and kept in Redis (development only).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

HEADER_REQUEST_ID = "X-Fal-Webhook-Request-Id"
HEADER_USER_ID = "X-Fal-Webhook-User-Id"
HEADER_TIMESTAMP = "X-Fal-Webhook-Timestamp"
HEADER_SIGNATURE = "X-Fal-Webhook-Signature"
MAX_SKEW_SECONDS = 300


def b64url_padded(data: bytes) -> str:
    """base64url with `=` padding, as fal's own JWKS serves `x`: fal's documented verifier decodes it with a
    plain base64.urlsafe_b64decode, which rejects unpadded input. Receivers written for fal's JWKS therefore
    work against ours unchanged."""
    return base64.urlsafe_b64encode(data).decode()


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def load_private_key(text: str) -> Ed25519PrivateKey:
    """A PEM (PKCS#8) key, or the raw 32-byte seed as base64/base64url/hex."""
    text = text.strip()
    if text.startswith("-----BEGIN"):
        key = serialization.load_pem_private_key(text.encode(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError("webhook signing keys must be Ed25519")
        return key
    for decode in (bytes.fromhex, b64url_decode, base64.b64decode):
        try:
            seed = decode(text)
        except (ValueError, binascii.Error):
            continue
        if len(seed) == 32:
            return Ed25519PrivateKey.from_private_bytes(seed)
    raise ValueError("a webhook signing key must be PEM or a 32-byte seed in hex or base64")


def raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(key: Ed25519PublicKey) -> str:
    return hashlib.sha256(raw_public(key)).hexdigest()[:16]


def message(request_id: str, user_id: str, timestamp: str, body: bytes) -> bytes:
    return "\n".join([request_id, user_id, timestamp, hashlib.sha256(body).hexdigest()]).encode()


def jwk(key: Ed25519PublicKey) -> dict:
    return {
        "kty": "OKP",
        "crv": "Ed25519",
        "x": b64url_padded(raw_public(key)),
        "kid": key_id(key),
        "alg": "EdDSA",
        "use": "sig",
    }


@dataclass
class WebhookSigner:
    keys: list[Ed25519PrivateKey]

    @classmethod
    def from_keys(cls, keys: Iterable[str]) -> WebhookSigner:
        """A signer of the configured keys (PEM or seeds; blank entries skipped); at least one is needed."""
        loaded = [load_private_key(text) for text in keys if text.strip()]
        if not loaded:
            raise ValueError("no webhook signing key")
        return cls(loaded)

    def headers(self, request_id: str, user_id: str, body: bytes, now: float | None = None) -> dict[str, str]:
        timestamp = str(int(now if now is not None else time.time()))
        signature = self.keys[0].sign(message(request_id, user_id, timestamp, body))
        return {
            HEADER_REQUEST_ID: request_id,
            HEADER_USER_ID: user_id,
            HEADER_TIMESTAMP: timestamp,
            HEADER_SIGNATURE: signature.hex(),
        }

    def jwks(self) -> dict:
        return {"keys": [jwk(key.public_key()) for key in self.keys]}


def new_seed() -> str:
    """A fresh private key as its 32-byte seed in hex (what load_private_key reads)."""
    return (
        Ed25519PrivateKey.generate()
        .private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        .hex()
    )


def verify(headers: Mapping[str, str], body: bytes, jwks: dict, now: float | None = None) -> bool:
    """fal's documented receiver check: four headers, timestamp within 5 min, any JWKS key verifies."""
    lowered = {k.lower(): v for k, v in headers.items()}
    try:
        request_id, user_id, timestamp, signature = (
            lowered[h.lower()]
            for h in (HEADER_REQUEST_ID, HEADER_USER_ID, HEADER_TIMESTAMP, HEADER_SIGNATURE)
        )
        if abs((now if now is not None else time.time()) - int(timestamp)) > MAX_SKEW_SECONDS:
            return False
        signed, sig = message(request_id, user_id, timestamp, body), bytes.fromhex(signature)
    except (KeyError, ValueError):
        return False
    for entry in jwks.get("keys", []):
        try:
            Ed25519PublicKey.from_public_bytes(b64url_decode(entry["x"].rstrip("="))).verify(sig, signed)
            return True
        except (InvalidSignature, ValueError, KeyError):
            continue
    return False
