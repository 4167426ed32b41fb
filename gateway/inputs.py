"""Request input: the priority header and the `image_url` policy, decided at submit so workers only ever
see what they may read (the model input is checked in producer/admission.py)."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from common.adapters import netguard
from common.adapters.fetch import decode_data_uri
from common.adapters.netguard import NetPolicy
from common.adapters.storage import parse_s3_url, request_output_prefix, uploads_prefix
from common.domain.auth import ANONYMOUS, Principal
from common.domain.errors import InputErrors, JobError
from common.domain.signed_urls import object_url_valid
from common.settings import GatewaySettings
from gateway.context import Gateway
from producer.admission import detail

INLINE_DATA_LIMIT = 256 * 1024  # data URIs above this travel through S3, not Redis


class InputWrites:
    """Large data-URI inputs a submit will store in S3, held until the request is admitted: a request the
    key's limits or the queue caps refuse, or whose input is invalid, leaves nothing behind."""

    def __init__(self, gw: Gateway):
        self._gw = gw
        self._pending: list[tuple[str, bytes]] = []

    def add(self, key: str, data: bytes) -> None:
        self._pending.append((key, data))

    def flush(self) -> None:
        """Store them (the request was admitted; its outputs' retention deletes them with the request)."""
        while self._pending:
            key, data = self._pending.pop()
            self._gw.objects.write(self._gw.settings.output_bucket, key, data, "application/octet-stream")


def priority(value: str | None) -> str:
    """`X-Fal-Queue-Priority`: `low` or `normal`; anything else counts as normal."""
    return "low" if (value or "").strip().lower() == "low" else "normal"


def check_url(url: str, policy: NetPolicy, loc: list[Any]) -> None:
    """The SSRF guard's submit-time check (the worker checks again when it connects)."""
    try:
        netguard.check_url(url, policy=policy)
    except JobError as exc:
        raise InputErrors([detail(loc, exc.message, exc.error_type)]) from exc


def has_dot_segments(key: str) -> bool:
    """`.`/`..` segments (also percent-encoded): literal on AWS, but some S3-compatible stores normalise
    them, so `files/<own prefix>/../../requests/<other id>/...` could leave the prefix it was checked
    against."""
    return any(unquote(segment) in (".", "..") for segment in key.replace("\\", "/").split("/"))


def may_read_s3(principal: Principal, settings: GatewaySettings, bucket: str, key: str) -> bool:
    if has_dot_segments(key):
        return False
    if principal.key_id == ANONYMOUS:
        return True
    if bucket == settings.output_bucket and key.startswith(uploads_prefix(settings, principal.key_id)):
        return True
    return any(f"{bucket}/{key}".startswith(entry) for entry in principal.s3_read if "/" in entry)


def own_object_key(url: str, secret: str) -> str | None:
    """The S3 key behind one of our signed `/objects/...` URLs, when the signature is valid."""
    parts = urlsplit(url)
    if not parts.path.startswith("/objects/"):
        return None
    query = parse_qs(parts.query)
    key = unquote(parts.path[len("/objects/") :])
    expires, signature = query.get("exp", [""])[0], query.get("sig", [""])[0]
    return key if object_url_valid(secret, key, expires, signature) else None


def own_bucket_key(url: str, settings: GatewaySettings) -> str | None:
    """The key behind a (presigned) path-style URL of our output bucket on a custom S3 endpoint, which is
    often private (MinIO, moto) and so out of reach of the SSRF guard: such inputs are read through S3."""
    if not settings.s3_endpoint_url:
        return None
    base = f"{settings.s3_endpoint_url.rstrip('/')}/{settings.output_bucket}/"
    return unquote(urlsplit(url).path[len(urlsplit(base).path) :]) if url.startswith(base) else None


def resolve_image_url(
    gw: Gateway,
    principal: Principal,
    url: str,
    request_id: str,
    field: str = "image_url",
    writes: InputWrites | None = None,
) -> str:
    """What the worker should fetch for `image_url` (or another image `field`, e.g. background_image_url);
    raises InputErrors for what it may not. A large data URI becomes an S3 object, stored when `writes` is
    flushed (at once without `writes`)."""
    settings, loc = gw.settings, ["body", field]
    scheme = url.split(":", 1)[0].lower()
    if scheme == "s3":
        try:
            bucket, key = parse_s3_url(url)
        except ValueError as exc:
            raise InputErrors([detail(loc, str(exc), "file_download_error")]) from exc
        if has_dot_segments(key):
            raise InputErrors(
                [detail(loc, "'.' and '..' segments are not allowed in an S3 key", "file_download_error")]
            )
        if not may_read_s3(principal, settings, bucket, key):
            raise InputErrors([detail(loc, f"this API key may not read {url}", "file_download_error")])
        return url
    if scheme == "data":
        if len(url) <= INLINE_DATA_LIMIT:
            return url
        try:
            data = decode_data_uri(url, max_bytes=settings.max_input_bytes)
        except JobError as exc:
            exc.field = field
            raise InputErrors(exc.detail()) from exc
        name = "input" if field == "image_url" else field
        key = f"{request_output_prefix(settings, request_id)}{name}"  # deleted with the request's outputs
        if writes is not None:
            writes.add(key, data)
        else:
            gw.objects.write(settings.output_bucket, key, data, "application/octet-stream")
        return f"s3://{settings.output_bucket}/{key}"
    own = own_object_key(url, gw.secret)
    if own is not None:  # the signature is the permission
        return f"s3://{settings.output_bucket}/{own}"
    bucket_key = own_bucket_key(url, settings)
    if bucket_key is not None and may_read_s3(principal, settings, settings.output_bucket, bucket_key):
        return f"s3://{settings.output_bucket}/{bucket_key}"
    check_url(url, gw.fetch_policy, loc)
    return url
