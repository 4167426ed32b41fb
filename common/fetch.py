"""Reading a job's input image: s3://, http(s):// or data: URIs, with size and time limits."""

from __future__ import annotations

import base64
import binascii
import re
from urllib.parse import unquote_to_bytes

import httpx

from common.errors import FileDownloadError, ImageTooLargeError
from common.storage import ObjectStore, parse_s3_url

_DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[^;,]*)*)(?P<b64>;base64)?,",
                       re.IGNORECASE)


def decode_data_uri(uri: str, *, max_bytes: int) -> bytes:
    match = _DATA_URI.match(uri)
    if not match:
        raise FileDownloadError("malformed data URI: expected data:<mime>[;base64],<payload>")
    payload = uri[match.end():]
    # base64 inflates by 4/3: refuse before decoding anything too large.
    if len(payload) * 3 // 4 > max_bytes + 3:
        raise ImageTooLargeError(f"data URI payload exceeds the limit of {max_bytes} bytes")
    if match.group("b64"):
        try:
            data = base64.b64decode(payload.strip(), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise FileDownloadError(f"malformed data URI: invalid base64 ({exc})") from exc
    else:
        data = unquote_to_bytes(payload)
    if not data:
        raise FileDownloadError("data URI is empty")
    if len(data) > max_bytes:
        raise ImageTooLargeError(f"input is {len(data)} bytes; the limit is {max_bytes} bytes")
    return data


def download_http(url: str, *, max_bytes: int, timeout: float) -> bytes:
    try:
        with httpx.stream("GET", url, timeout=timeout, follow_redirects=True) as response:
            if response.status_code != 200:
                raise FileDownloadError(f"downloading the image failed: HTTP {response.status_code}")
            declared = response.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise ImageTooLargeError(f"input is {declared} bytes; the limit is {max_bytes} bytes")
            chunks, total = [], 0
            for chunk in response.iter_bytes():
                total += len(chunk)
                if total > max_bytes:
                    raise ImageTooLargeError(f"input exceeds the limit of {max_bytes} bytes")
                chunks.append(chunk)
    except httpx.HTTPError as exc:
        raise FileDownloadError(f"downloading the image failed: {type(exc).__name__}: {exc}") from exc
    if not total:
        raise FileDownloadError("downloaded image is empty (0 bytes)")
    return b"".join(chunks)


def fetch_input(url: str, *, objects: ObjectStore, max_bytes: int, timeout: float) -> bytes:
    scheme = url.split(":", 1)[0].lower()
    if scheme == "data":
        return decode_data_uri(url, max_bytes=max_bytes)
    if scheme == "s3":
        try:
            bucket, key = parse_s3_url(url)
        except ValueError as exc:
            raise FileDownloadError(str(exc)) from exc
        data = objects.read(bucket, key, max_bytes=max_bytes)
        if not data:
            raise FileDownloadError(f"{url} is empty (0 bytes)")
        return data
    if scheme in ("http", "https"):
        return download_http(url, max_bytes=max_bytes, timeout=timeout)
    raise FileDownloadError(f"unsupported URL scheme {scheme!r}; use http, https, data or s3")
