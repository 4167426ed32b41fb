"""Reading a job's input image (s3://, http(s)://, data:) with size and time limits; http(s) goes through
the SSRF guard (common.adapters.netguard). Errors are fal's file_download_error and image_too_large."""

from __future__ import annotations

import binascii
import re
import zlib
from urllib.parse import unquote_to_bytes

import httpcore
import httpx

from common.adapters.netguard import (
    NetPolicy,
    UrlNotAllowedError,
    guarded_pool,
    parse_http_url,
    scheme_of,
)
from common.adapters.storage import ObjectStore, parse_s3_url
from common.domain.errors import FileDownloadError, ImageTooLargeError

_DATA_URI = re.compile(
    r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[^;,]*)*)(?P<b64>;base64)?,", re.IGNORECASE
)
_WHITESPACE = re.compile(rb"[\t\n\f\r ]+")
_REDIRECTS = {301, 302, 303, 307, 308}
_HEADERS = [
    (b"User-Agent", b"birefnet-serve (image fetch)"),
    (b"Accept", b"image/*, */*;q=0.5"),
    # Images are compressed already; asking for identity keeps compression bombs out of the download.
    (b"Accept-Encoding", b"identity"),
]
_NETWORK_ERRORS = (
    httpcore.TimeoutException,
    httpcore.NetworkError,
    httpcore.ProtocolError,
    httpcore.UnsupportedProtocol,
    httpcore.ProxyError,
    OSError,
)


def decode_data_uri(uri: str, *, max_bytes: int) -> bytes:
    match = _DATA_URI.match(uri)
    if not match:
        raise FileDownloadError("malformed data URI: expected data:<mime>[;base64],<payload>")
    start = match.end()
    if match.group("b64"):
        # base64 inflates by 4/3: refuse before decoding anything too large.
        if (len(uri) - start) * 3 // 4 > max_bytes + 3:
            raise ImageTooLargeError(f"data URI payload exceeds the limit of {max_bytes} bytes")
        try:
            data = _decode_base64(uri, start)
        except (binascii.Error, ValueError) as exc:
            raise FileDownloadError(f"malformed data URI: invalid base64 ({exc})") from exc
    else:
        if len(uri) - start > 3 * max_bytes:  # a percent-escape is at most 3 characters per byte
            raise ImageTooLargeError(f"data URI payload exceeds the limit of {max_bytes} bytes")
        data = unquote_to_bytes(uri[start:])
    if not data:
        raise FileDownloadError("data URI is empty")
    if len(data) > max_bytes:
        raise ImageTooLargeError(f"input is {len(data)} bytes; the limit is {max_bytes} bytes")
    return data


def _decode_base64(uri: str, start: int) -> bytes:
    """The base64 payload of `uri` from `start`, with as few copies of a (tens of MB) payload as possible:
    one ASCII encoding, viewed in place; line breaks and missing padding (both common) cost a copy only
    when present."""
    raw = memoryview(uri.encode("ascii"))[start:]  # UnicodeEncodeError (a ValueError) for non-ASCII
    if _WHITESPACE.search(raw):  # line-wrapped base64
        raw = memoryview(_WHITESPACE.sub(b"", raw))
    if len(raw) % 4:  # unpadded: rare, and small in practice
        body = raw.tobytes().rstrip(b"=")
        raw = memoryview(body + b"=" * (-len(body) % 4))
    # binascii reads the view in place (base64.b64decode would copy it first); strict: only the alphabet
    # and correct padding, as b64decode(validate=True).
    return binascii.a2b_base64(raw, strict_mode=True)


def _header(response: httpcore.Response, name: bytes) -> str | None:
    for key, value in response.headers:
        if key.lower() == name:
            return value.decode("latin-1").strip()
    return None


def _read_body(response: httpcore.Response, max_bytes: int) -> bytes:
    declared = _header(response, b"content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise ImageTooLargeError(f"input is {declared} bytes; the limit is {max_bytes} bytes")
    encoding = (_header(response, b"content-encoding") or "identity").lower()
    if encoding not in ("identity", "gzip", "x-gzip", "deflate"):
        raise FileDownloadError(f"unsupported Content-Encoding {encoding!r}")
    # Some servers compress anyway; inflate with a bound on the output, never all at once.
    inflater = zlib.decompressobj(47 if "gzip" in encoding else 15) if encoding != "identity" else None
    chunks: list[bytes] = []
    total = 0
    for chunk in response.iter_stream():
        if inflater is not None:
            chunk = inflater.decompress(chunk, max_bytes - total + 1)
            if inflater.unconsumed_tail:
                raise ImageTooLargeError(
                    f"input exceeds the limit of {max_bytes} bytes (after decompression)"
                )
        total += len(chunk)
        if total > max_bytes:
            raise ImageTooLargeError(f"input exceeds the limit of {max_bytes} bytes")
        chunks.append(chunk)
    if not total:
        raise FileDownloadError("downloaded image is empty (0 bytes)")
    return b"".join(chunks)


def download_http(url: str, *, max_bytes: int, timeout: float, policy: NetPolicy) -> bytes:
    """GET an image over http(s): redirects followed by hand and re-checked at every hop, `timeout`
    seconds in all (connects, redirects and body), at most `max_bytes`."""
    current = url
    try:
        with guarded_pool(policy, timeout) as (pool, _backend):
            for _hop in range(policy.max_redirects + 1):
                target = parse_http_url(current, policy)  # every hop: scheme, credentials, port
                with pool.stream(
                    "GET",
                    target.core_url(),
                    headers=[(b"Host", target.host_header), *_HEADERS],
                    extensions={
                        "timeout": {"connect": timeout, "read": timeout, "write": timeout, "pool": timeout}
                    },
                ) as response:
                    if response.status in _REDIRECTS:
                        location = _header(response, b"location")
                        if not location:
                            raise FileDownloadError(
                                f"HTTP {response.status} redirect without a Location header"
                            )
                        try:
                            current = str(httpx.URL(current).join(location))
                        except (httpx.InvalidURL, ValueError) as exc:
                            raise FileDownloadError(
                                f"malformed redirect Location {location!r}: {exc}"
                            ) from None
                        continue
                    if response.status != 200:
                        raise FileDownloadError(f"downloading the image failed: HTTP {response.status}")
                    return _read_body(response, max_bytes)
            raise FileDownloadError(f"too many redirects (more than {policy.max_redirects})")
    except UrlNotAllowedError as exc:
        if current != url:
            raise UrlNotAllowedError(f"redirected to {current}: {exc.message}") from None
        raise
    except _NETWORK_ERRORS as exc:
        raise FileDownloadError(f"downloading the image failed: {_describe(exc)}") from None


def _describe(exc: Exception) -> str:
    if isinstance(exc, httpcore.TimeoutException):
        return f"timed out ({exc or type(exc).__name__})"
    if isinstance(exc, httpcore.ConnectError):
        return f"could not connect ({exc})"
    if isinstance(exc, httpcore.ProtocolError):
        return f"the server's response is malformed or incomplete ({exc})"
    return f"{type(exc).__name__}: {exc}"


def fetch_input(
    url: str,
    *,
    objects: ObjectStore,
    max_bytes: int,
    timeout: float,
    policy: NetPolicy,
    version_id: str | None = None,
    if_match: str | None = None,
) -> bytes:
    """The input's bytes; http(s) URLs are fetched under `policy` (the worker's: NetPolicy.from_settings).

    For s3:// URLs of bucket uploads: `version_id` reads that version (the URL then ends in
    `?versionId=<it>`); `if_match` (an ETag) reads the object only while it is still the upload the job
    was made for (else SupersededError)."""
    scheme = scheme_of(url)
    if scheme == "data":
        return decode_data_uri(url, max_bytes=max_bytes)
    if scheme == "s3":
        try:
            bucket, key = parse_s3_url(url)
        except ValueError as exc:
            raise FileDownloadError(str(exc)) from exc
        suffix = f"?versionId={version_id}"
        if version_id and key.endswith(suffix):
            key = key[: -len(suffix)]
        data = objects.read(
            bucket, key, max_bytes=max_bytes, version_id=version_id, if_match=None if version_id else if_match
        )
        if not data:
            raise FileDownloadError(f"{url} is empty (0 bytes)")
        return data
    if scheme in ("http", "https"):
        return download_http(url, max_bytes=max_bytes, timeout=timeout, policy=policy)
    raise FileDownloadError(f"unsupported URL scheme {scheme!r}; use http, https, data or s3")
