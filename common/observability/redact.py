"""Credentials never reach a log line, an error message or a settings dump: one helper masks them in URLs
(`redis://user:***@host`), Authorization headers (`Key alice:***`), signed query parameters and settings.
Every process installs `install_log_redaction()` at start, so what any library logs passes through it too."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from typing import Any

MASK = "***"

# scheme://user:password@host (or scheme://token@host): the secret part masked, the user name kept.
_URL_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/\s@?#]*)@")
# Authorization: Key id:secret / Bearer token / Basic b64 (header lines, repr'd dicts, JSON).
_AUTH_VALUE = re.compile(r"(?P<head>\b(?:Key|Bearer|Basic|Token)\s+)(?P<cred>[^\s'\",;]+)", re.IGNORECASE)
# Query or key=value parameters that carry a secret (our signed URLs, presigned S3 URLs, tokens).
_SECRET_PARAM = re.compile(
    r"(?P<head>(?:[?&;\s,{(]|^)[\"']?(?:sig|signature|x-amz-signature|x-amz-credential|x-amz-security-token|"
    r"token|auth_token|access_token|password|passwd|secret|api_key|apikey)[\"']?\s*[=:]\s*[\"']?)"
    r"(?P<value>[^&\s'\",;}]+)",
    re.IGNORECASE,
)
# Settings whose value is a secret whatever it looks like.
_SECRET_FIELD = re.compile(r"password|secret|token|signing_keys|api_keys|tls_key", re.IGNORECASE)


def _userinfo(match: re.Match[str]) -> str:
    user, colon, _ = match["userinfo"].partition(":")
    return f"{match['scheme']}{user}:{MASK}@" if colon else f"{match['scheme']}{MASK}@"


def _credential(match: re.Match[str]) -> str:
    key_id, colon, _ = match["cred"].partition(":")
    if not colon and len(match["cred"]) < 16:  # prose ("Key lookup"), not a credential
        return match[0]
    return f"{match['head']}{key_id}:{MASK}" if colon and key_id else f"{match['head']}{MASK}"


def redact_text(text: str) -> str:
    """`text` with every credential it shows masked (URLs' user info, Authorization values, secret
    parameters)."""
    if not text:
        return text
    text = _URL_USERINFO.sub(_userinfo, text)
    text = _AUTH_VALUE.sub(_credential, text)
    return _SECRET_PARAM.sub(lambda m: f"{m['head']}{MASK}", text)


def redact_url(url: str) -> str:
    """A URL safe to show: password (or bare token) and signature parameters masked."""
    return redact_text(url)


_SECRET_HEADERS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "cookie",
        "set-cookie",
        "x-amz-security-token",
        "x-fal-webhook-signature",
    }
)


def redact_headers(headers: Mapping[str, str] | Iterable[tuple[str, str]]) -> dict[str, str]:
    """Headers safe to log: credential headers masked (a `Key <id>:…` keeps its key id), others redacted as
    text."""
    items = headers.items() if isinstance(headers, Mapping) else headers
    shown = {}
    for name, value in items:
        if name.lower() in _SECRET_HEADERS:
            scheme, _, credential = value.partition(" ")
            key_id, colon, _ = credential.partition(":")
            shown[name] = (
                f"{scheme} {key_id}:{MASK}"
                if credential and colon
                else (f"{scheme} {MASK}" if credential else MASK)
            )
        else:
            shown[name] = redact_text(value)
    return shown


def redact_settings(values: Mapping[str, Any]) -> dict[str, Any]:
    """A settings dump safe to show: secret fields masked when set, every text value redacted as text."""

    def shown(name: str, value: Any) -> Any:
        if _SECRET_FIELD.search(name) and value not in ("", None, (), [], {}):
            return MASK
        if isinstance(value, str):
            return redact_text(value)
        if isinstance(value, Mapping):
            return {k: shown(str(k), v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(shown(name, v) for v in value)
        return value

    return {name: shown(name, value) for name, value in values.items()}


class RedactingFormatter(logging.Formatter):
    """Wraps a handler's formatter: the finished line (message, arguments, traceback) is redacted."""

    def __init__(self, inner: logging.Formatter | None):
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        return redact_text(self.inner.format(record))


_installed = False


def install_log_redaction() -> None:
    """Redact every log record of this process: its message is rendered and masked as it is created (this
    survives Celery and uvicorn replacing the handlers), and the root handlers' formatters also mask
    tracebacks. Idempotent."""
    global _installed
    for handler in logging.getLogger().handlers:
        if not isinstance(handler.formatter, RedactingFormatter):
            handler.setFormatter(RedactingFormatter(handler.formatter))
    if _installed:
        return
    _installed = True
    make_record = logging.getLogRecordFactory()

    def redacting_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a bad format string is reported by the handler, as logging always does
            return record
        masked = redact_text(message)
        if masked != message:
            record.msg, record.args = masked, ()
        return record

    logging.setLogRecordFactory(redacting_record)
