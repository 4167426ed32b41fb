"""HMAC-signed, expiring gateway URLs for stored files (`{public}/objects/{key}?exp=<unix>&sig=<hmac>`,
streamed from S3 by the gateway, so callers never need to reach S3), and short-lived upload tokens
(fal's `storage/auth/token`: `<base64url payload>.<hmac>`)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import time
from urllib.parse import quote


def _sign(secret: str, text: str) -> str:
    digest = hmac.new(secret.encode(), text.encode("utf-8", "surrogatepass"), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest[:24]).rstrip(b"=").decode()


def _object_text(key: str, expires: int) -> str:
    return f"object\n{key}\n{expires}"


def object_url(base_url: str, secret: str, key: str, ttl: float, now: float | None = None) -> str:
    expires = int((now if now is not None else time.time()) + ttl)
    signature = _sign(secret, _object_text(key, expires))
    return f"{base_url.rstrip('/')}/objects/{quote(key)}?exp={expires}&sig={signature}"


# ASCII digits only, and no more than a Unix time needs: `str.isdigit` also takes Unicode digits ("²"), and a
# 5000-digit number is refused by int() (CPython's digit limit).
_EXPIRES = re.compile(r"[0-9]{1,15}")


def _same(expected: str, given: str) -> bool:
    """Constant-time comparison that is False (not TypeError) for a non-ASCII `given`."""
    return hmac.compare_digest(expected.encode(), given.encode("utf-8", "surrogatepass"))


def object_url_valid(secret: str, key: str, expires: str, signature: str, now: float | None = None) -> bool:
    if not _EXPIRES.fullmatch(expires) or int(expires) < (now if now is not None else time.time()):
        return False
    return _same(_sign(secret, _object_text(key, int(expires))), signature)


def make_token(secret: str, owner: str, ttl: float) -> tuple[str, int]:
    expires = int(time.time() + ttl)
    payload = base64.urlsafe_b64encode(json.dumps({"o": owner, "e": expires}).encode()).rstrip(b"=").decode()
    return f"{payload}.{_sign(secret, 'token:' + payload)}", expires


def read_token(secret: str, token: str) -> str | None:
    """The owner named by a valid, unexpired upload token."""
    payload, _, signature = token.partition(".")
    if not signature or not payload.isascii() or not _same(_sign(secret, "token:" + payload), signature):
        return None
    try:  # signed by us, so well-formed; checked anyway, as a malformed token must never become a 500
        data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        owner, expires = data["o"], data.get("e", 0)
    except (binascii.Error, ValueError, KeyError, TypeError):
        return None
    if not isinstance(owner, str) or not isinstance(expires, int | float):
        return None
    return owner if expires >= time.time() else None
