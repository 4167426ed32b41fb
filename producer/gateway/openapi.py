"""The OpenAPI document: FastAPI's, plus the fal input schemas and the API-key scheme.

Submit and run read their bodies themselves (fal validates in the model, after queueing), so the input
models are attached to those routes by reference here rather than by FastAPI.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from common.schemas import BiRefNetInput, BiRefNetV2Input

REF = "#/components/schemas/{model}"


def input_schemas() -> dict[str, Any]:
    schemas: dict[str, Any] = {}
    for model in (BiRefNetInput, BiRefNetV2Input):
        schema = model.model_json_schema(ref_template=REF)
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
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
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            schema.setdefault("components", {}).setdefault("schemas", {}).update(input_schemas())
            add_common_errors(schema, auth)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
