"""The OpenAPI document: FastAPI's, plus the fal input schemas (submit and run read their bodies
themselves, so the input models are attached by reference) and the API-key scheme."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from common.domain.extensions import OutputExtensions
from common.domain.schemas import BiRefNetInput, BiRefNetV2Input, ComposeInput
from common.domain.video import BiRefNetVideoInput
from gateway.parsing import MAX_LIFETIME

REF = "#/components/schemas/{model}"


# The schemes BiRefNetInput's validator takes (case-insensitive), spelled for every regex dialect.
IMAGE_URL_PATTERN = r"^([Hh][Tt][Tt][Pp][Ss]?|[Dd][Aa][Tt][Aa]|[Ss]3):"


# A 1x1 PNG: an example that needs no network.
EXAMPLE_IMAGE = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGA"
    "hKmMIQAAAABJRU5ErkJggg=="
)


def input_schemas() -> dict[str, Any]:
    schemas: dict[str, Any] = {}
    for model in (BiRefNetInput, BiRefNetV2Input, ComposeInput):
        schema = model.model_json_schema(ref_template=REF)
        schemas.update(schema.pop("$defs", {}))
        # fal's own fields first, then the extension fields the model inherits.
        properties = schema.get("properties", {})
        schema["properties"] = {
            **{k: v for k, v in properties.items() if k not in OutputExtensions.model_fields},
            **{k: v for k, v in properties.items() if k in OutputExtensions.model_fields},
        }
        schema["properties"].get("image_url", {}).setdefault("pattern", IMAGE_URL_PATTERN)
        if schema.get("required") == ["image_url"]:
            schema.setdefault("examples", [{"image_url": EXAMPLE_IMAGE}])
        schemas[model.__name__] = schema
    video = BiRefNetVideoInput.model_json_schema(ref_template=REF)  # fal-ai/birefnet/v2/video
    schemas.update(video.pop("$defs", {}))
    video["properties"]["video_url"].setdefault("pattern", IMAGE_URL_PATTERN)
    schemas[BiRefNetVideoInput.__name__] = video
    return schemas


ERROR = {"application/json": {"schema": {"$ref": REF.format(model="ErrorBody")}}}
# Answers any operation may get, besides its own: from the middleware (413), auth throttling and quotas
# (429), an unreachable Redis (503), or a bug (500). All in fal's flat error shape.
COMMON_ERRORS = {
    "413": "Request body larger than gateway_max_body_bytes",
    "429": "Too many requests (failed authentications from this address or for this key); see Retry-After",
    "500": "Internal gateway error",
    "503": "Job store or queue unreachable; retry shortly",
}


LIFECYCLE_HEADERS = ("x-fal-object-lifecycle-preference", "X-Fal-Object-Lifecycle")


def lifecycle_content() -> dict[str, Any]:
    """What parsing.lifecycle_seconds accepts: a JSON object whose expiration_duration_seconds, when
    present, is a number of seconds in range (other members, e.g. initial_acl, are ignored)."""
    seconds = {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_LIFETIME}
    return {
        "application/json": {
            "schema": {"type": "object", "properties": {"expiration_duration_seconds": seconds}}
        }
    }


def describe_lifecycle_headers(schema: dict[str, Any]) -> None:
    """FastAPI documents these headers as plain strings; they are JSON (OpenAPI's `content` parameters)."""
    for path in schema.get("paths", {}).values():
        for operation in path.values():
            for parameter in operation.get("parameters", []):
                if parameter.get("in") == "header" and parameter.get("name") in LIFECYCLE_HEADERS:
                    parameter.pop("schema", None)
                    parameter["content"] = lifecycle_content()


REQUEST_SCOPED = {
    "status": ("get", "/status"),
    "status_stream": ("get", "/status/stream"),
    "result": ("get", ""),
    "cancel": ("put", "/cancel"),
}


def add_links(schema: dict[str, Any]) -> None:
    """OpenAPI links from a submit's `request_id` to the request-scoped routes (stateful testing follows
    them)."""
    paths = schema.get("paths", {})
    base = next((path for path in paths if path.endswith("/requests/{request_id}")), None)
    if base is None:
        return
    links = {}
    for name, (method, suffix) in REQUEST_SCOPED.items():
        operation_id = paths.get(base + suffix, {}).get(method, {}).get("operationId")
        if operation_id:
            links[name] = {
                "operationId": operation_id,
                "parameters": {"request_id": "$response.body#/request_id"},
            }
    for path, methods in paths.items():
        if path.startswith("/queue/") and "/requests/" not in path and "post" in methods:
            methods["post"].get("responses", {}).get("200", {})["links"] = links


def add_common_errors(schema: dict[str, Any], auth: bool) -> None:
    for path in schema.get("paths", {}).values():
        for method, operation in path.items():
            responses = operation.setdefault("responses", {})
            for code, description in COMMON_ERRORS.items():
                if code == "413" and method not in ("post", "put"):
                    continue
                if code == "429" and "security" not in operation and "Authorization" not in str(operation):
                    continue
                responses.setdefault(code, {"description": description, "content": ERROR})
            if not auth:  # gateway_auth=off: no operation needs a key (and a 401 never happens)
                operation.pop("security", None)
                responses.pop("401", None)
    if not auth:
        schema.get("components", {}).pop("securitySchemes", None)


def install_openapi(app: FastAPI, auth: bool = True) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            schema.setdefault("components", {}).setdefault("schemas", {}).update(input_schemas())
            add_common_errors(schema, auth)
            describe_lifecycle_headers(schema)
            add_links(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
