"""The gateway's one request-parsing layer: every JSON body and header value any route reads.

JSON is strict (UTF-8, no NaN/Infinity, no duplicate keys, depth at most MAX_JSON_DEPTH, no lone
surrogates), so whatever passes can be written back as valid JSON. Header values are bounded and parsed
exactly; a malformed one is a 400 naming the header."""

from __future__ import annotations

import json
import math
import re
from typing import Any

from gateway.responses import FalError

MAX_JSON_DEPTH = 32  # fal's inputs are flat; the deepest legitimate document here has depth 2
MAX_HEADER_JSON = 4096  # bytes of a JSON-valued header (x-fal-object-lifecycle-preference)
MAX_LIFETIME = 10 * 365 * 86400  # seconds: retention beyond ten years is a typo, not a preference
TIMEOUT_PATTERN = r"^[0-9]{1,12}(\.[0-9]{1,9})?$"  # what fal's clients send: str(float), e.g. "30.0"
TIMEOUT_MAX_LENGTH = 22
# `type/subtype` with optional `; parameters`, printable ASCII (what S3 stores as Content-Type).
CONTENT_TYPE_PATTERN = (
    r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}(;[ -~]{0,200})?$"
)
_CONTENT_TYPE = re.compile(CONTENT_TYPE_PATTERN)


class InvalidJson(ValueError):
    """Where (a JSON path below the document, or a character offset) and why a document was refused."""

    def __init__(self, loc: list[Any], message: str):
        super().__init__(message)
        self.loc, self.message = loc, message


def _no_constant(name: str) -> Any:
    raise InvalidJson([], f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise InvalidJson([], f"number {text[:40]} is out of range")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise InvalidJson([], f"duplicate key {key!r}"[:200])
        result[key] = value
    return result


def strict_loads(raw: bytes | str, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse one JSON document strictly (see the module docstring); raises InvalidJson."""
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidJson([exc.start], f"invalid UTF-8 at byte {exc.start}") from None
    else:
        text = raw
    try:
        data = json.loads(
            text, parse_constant=_no_constant, parse_float=_finite_float, object_pairs_hook=_unique_keys
        )
    except InvalidJson:
        raise
    except json.JSONDecodeError as exc:
        raise InvalidJson([exc.pos], exc.msg) from None
    except RecursionError:
        raise InvalidJson([], f"nested deeper than {max_depth} levels") from None
    except ValueError as exc:  # e.g. an integer with more digits than Python converts
        raise InvalidJson([], str(exc)[:200]) from None
    check_document(data, max_depth)
    return data


def check_document(data: Any, max_depth: int = MAX_JSON_DEPTH) -> None:
    """Depth and proper Unicode of a parsed document, iteratively (a deep one must not recurse here)."""
    stack: list[tuple[Any, list[Any]]] = [(data, [])]
    while stack:
        value, loc = stack.pop()
        if isinstance(value, str):
            check_text(value, loc)
        elif isinstance(value, dict | list):
            if len(loc) >= max_depth:
                raise InvalidJson(loc[:8], f"nested deeper than {max_depth} levels")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(key, str):
                    check_text(key, loc)
                stack.append((item, [*loc, key]))


def check_text(value: str, loc: list[Any]) -> None:
    if value.isascii():
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidJson(
            loc, f"string contains a lone surrogate (U+{ord(value[exc.start]):04X}): not valid Unicode"
        ) from None


def json_safe(value: Any) -> Any:
    """`value` with NaN/Infinity floats as strings, for answers that echo what a caller sent."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    return value


# --- bodies ---
def body_error(exc: InvalidJson) -> FalError:
    """A 422 in FastAPI's `json_invalid` shape, the location inside the body included."""
    return FalError(
        422,
        {
            "detail": [
                {
                    "type": "json_invalid",
                    "loc": ["body", *exc.loc],
                    "msg": "JSON decode error",
                    "input": {},
                    "ctx": {"error": exc.message},
                }
            ]
        },
    )


def json_object_body(raw: bytes) -> dict:
    """The JSON object body; a missing body is `{}` (JS sends none without input). Anything else: 422 now."""
    if not raw.strip():
        return {}
    try:
        data = strict_loads(raw)
    except InvalidJson as exc:
        raise body_error(exc) from None
    if not isinstance(data, dict):
        raise FalError(
            422,
            {
                "detail": [
                    {
                        "type": "model_attributes_type",
                        "loc": ["body"],
                        "msg": "Input should be a valid dictionary or object to extract fields from",
                        "input": data,
                    }
                ]
            },
        )
    return data


# --- headers ---
def bad_header(name: str, why: str) -> FalError:
    return FalError.flat(400, f"Invalid {name} header: {why}", "bad_request")


def start_timeout(value: str | None, name: str = "X-Fal-Request-Timeout") -> float | None:
    """Seconds a request may wait before it starts (0: no limit). Sent but not a plain number: 400, as on
    fal."""
    if value is None:
        return None
    if len(value) > TIMEOUT_MAX_LENGTH or not re.match(TIMEOUT_PATTERN, value):
        raise bad_header(name, f"{value[:40]!r} is not a number of seconds")
    return float(value) or None


def lifecycle_seconds(value: str | None, name: str = "x-fal-object-lifecycle-preference") -> int | None:
    """`expiration_duration_seconds` of a JSON lifecycle preference (other fields, e.g. initial_acl, are
    ignored; so is a preference without it). Malformed JSON or a bad number: 400 naming the header."""
    if value is None or not value.strip():
        return None
    if len(value) > MAX_HEADER_JSON:
        raise bad_header(name, f"longer than {MAX_HEADER_JSON} characters")
    try:
        data = strict_loads(value)
    except InvalidJson as exc:
        raise bad_header(name, f"not valid JSON ({exc.message})") from None
    if not isinstance(data, dict):
        raise bad_header(name, 'expected a JSON object such as {"expiration_duration_seconds": 3600}')
    if "expiration_duration_seconds" not in data:
        return None
    seconds = data["expiration_duration_seconds"]
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not 0 < seconds <= MAX_LIFETIME:
        raise bad_header(
            name, f"expiration_duration_seconds must be a number of seconds in 1..{MAX_LIFETIME}"
        )
    return max(1, int(seconds))


def valid_content_type(value: str) -> bool:
    return bool(_CONTENT_TYPE.match(value))
