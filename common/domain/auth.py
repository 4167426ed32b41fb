"""API keys for the gateway: `Authorization: Key <id:secret | token>` (or `Bearer`), hashed at rest as
`sha256$<hex>` (fast; also finds a bare token by its hash) or `scrypt$n$r$p$<salt>$<hash>` (slow on purpose;
verified credentials are cached by SHA-256, so fal's 10 status polls a second stay cheap).
`python -m ops new-key --id team-a` prints a fresh FAL_KEY and the entry to configure (new_key).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, Field, field_validator

SCRYPT_PARAMS = (2**14, 8, 1)
ANONYMOUS = "anonymous"
# Owner names the service uses itself: the auth-off namespace (which may read everything), bucket uploads'
# jobs, webhooks without a user. A configured key with one of these ids would act as that owner.
RESERVED_KEY_IDS = frozenset({ANONYMOUS, "s3", "system"})


class ApiKeyConfig(BaseModel):
    """One configured API key."""

    id: str = Field(description="Key id: the part before ':' in FAL_KEY; owns its requests and uploads.")
    hash: str = Field(description="sha256$<hex> or scrypt$n$r$p$<salt hex>$<hash hex> of the secret.")
    user_id: str | None = Field(None, description="Sent as X-Fal-Webhook-User-Id; defaults to the key id.")
    admin: bool = Field(False, description="May call the /admin endpoints.")
    s3_read: list[str] = Field(
        default_factory=list,
        description="'bucket/prefix' entries an s3:// image_url may name ('bucket/' = all).",
    )
    max_concurrent: int | None = Field(
        None,
        ge=1,
        description="Most requests of this key IN_QUEUE or IN_PROGRESS at once; more: 429. None: no limit.",
    )
    requests_per_minute: int | None = Field(
        None, ge=1, description="Most submits and sync runs accepted in any 60 s; more: 429. None: no limit."
    )
    mask_cache: Literal["key", "shared"] = Field(
        "key",
        description="Content cache scope: 'key' (masks are reused among this key's requests only) or "
        "'shared' (with every key and bucket upload that shares).",
    )

    @field_validator("id")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("a key id may not be empty (jobs without an owner would match it)")
        if value.strip().lower() in RESERVED_KEY_IDS:
            raise ValueError(
                f"key id {value!r} is reserved for the service's own use "
                f"({', '.join(sorted(RESERVED_KEY_IDS))}); choose another id"
            )
        if ":" in value or value != value.strip():
            raise ValueError(
                f"key id {value!r} may not contain ':' or surrounding blanks (FAL_KEY is id:secret)"
            )
        return value

    @field_validator("hash")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        scheme = value.split("$", 1)[0]
        if scheme not in ("sha256", "scrypt"):
            raise ValueError("hash must start with 'sha256$' or 'scrypt$'")
        return value


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key id owns requests; user_id signs webhooks."""

    key_id: str
    user_id: str
    admin: bool = False
    s3_read: tuple[str, ...] = ()
    max_concurrent: int | None = None
    requests_per_minute: int | None = None
    mask_cache: str = "key"


ANONYMOUS_PRINCIPAL = Principal(key_id=ANONYMOUS, user_id=ANONYMOUS, admin=True)


def sha256_hex(value: str | bytes) -> str:
    return hashlib.sha256(value.encode() if isinstance(value, str) else value).hexdigest()


def hash_secret(secret: str, scheme: str = "scrypt") -> str:
    if scheme == "sha256":
        return f"sha256${sha256_hex(secret)}"
    n, r, p = SCRYPT_PARAMS
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(secret.encode(), salt=salt, n=n, r=r, p=p, dklen=32)
    return f"scrypt${n}${r}${p}${salt.hex()}${digest.hex()}"


def verify_secret(secret: str, stored: str) -> bool:
    scheme, _, rest = stored.partition("$")
    if scheme == "sha256":
        return hmac.compare_digest(sha256_hex(secret), rest)
    if scheme == "scrypt":
        n, r, p, salt, digest = rest.split("$")
        got = hashlib.scrypt(
            secret.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p), dklen=len(digest) // 2
        )
        return hmac.compare_digest(got.hex(), digest)
    return False


def credential_from_header(value: str | None) -> str | None:
    """The credential of an `Authorization: Key …` or `Bearer …` header."""
    if not value:
        return None
    scheme, _, credential = value.strip().partition(" ")
    if scheme.lower() not in ("key", "bearer") or not credential.strip():
        return None
    return credential.strip()


class KeyRing:
    """Configured keys, looked up by id (id:secret) or by SHA-256 (bare tokens)."""

    def __init__(self, keys: list[ApiKeyConfig], cache_size: int = 4096):
        self._by_id = {key.id: key for key in keys}
        self._by_token_hash = {
            key.hash.split("$", 1)[1]: key for key in keys if key.hash.startswith("sha256$")
        }
        self._verified: OrderedDict[str, Principal] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()  # the gateway verifies on the event loop and in its thread pool

    @staticmethod
    def _principal(key: ApiKeyConfig) -> Principal:
        return Principal(
            key_id=key.id,
            user_id=key.user_id or key.id,
            admin=key.admin,
            s3_read=tuple(key.s3_read),
            max_concurrent=key.max_concurrent,
            requests_per_minute=key.requests_per_minute,
            mask_cache=key.mask_cache,
        )

    def cached(self, credential: str | None) -> Principal | None:
        """A credential verified before (no hashing cost beyond one SHA-256)."""
        if not credential:
            return None
        fingerprint = sha256_hex(credential)
        with self._lock:
            found = self._verified.get(fingerprint)
            if found is not None:
                self._verified.move_to_end(fingerprint)
        return found

    def authenticate(self, credential: str | None) -> Principal | None:
        if not credential:
            return None
        cached = self.cached(credential)
        if cached is not None:
            return cached
        fingerprint = sha256_hex(credential)
        principal = self._check(credential, fingerprint)
        if principal is not None:
            with self._lock:
                self._verified[fingerprint] = principal
                if len(self._verified) > self._cache_size:
                    self._verified.popitem(last=False)
        return principal

    def _check(self, credential: str, fingerprint: str) -> Principal | None:
        key_id, sep, secret = credential.partition(":")
        if sep:
            key = self._by_id.get(key_id)
            return self._principal(key) if key is not None and verify_secret(secret, key.hash) else None
        key = self._by_token_hash.get(fingerprint)
        return self._principal(key) if key is not None else None


def new_key(
    key_id: str, *, user_id: str | None = None, admin: bool = False, scheme: str = "scrypt"
) -> tuple[str, dict]:
    """A fresh FAL_KEY and the configuration entry that accepts it."""
    secret = secrets.token_urlsafe(32)
    entry = ApiKeyConfig(id=key_id, hash=hash_secret(secret, scheme), user_id=user_id, admin=admin)
    return f"{key_id}:{secret}", entry.model_dump(exclude_defaults=True)
