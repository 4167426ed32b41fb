"""The OpenAPI document: FastAPI's, plus the fal input schemas and the API-key scheme.

Submit and run read their bodies themselves (fal validates in the model, after queueing), so the input
models are attached to those routes by reference here rather than by FastAPI.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from common.extensions import OutputExtensions
from common.schemas import BiRefNetInput, BiRefNetV2Input, ComposeInput

REF = "#/components/schemas/{model}"


def input_schemas() -> dict[str, Any]:
    schemas: dict[str, Any] = {}
    for model in (BiRefNetInput, BiRefNetV2Input, ComposeInput):
        schema = model.model_json_schema(ref_template=REF)
        schemas.update(schema.pop("$defs", {}))
        # fal's own fields first, then the extension fields the model inherits.
        properties = schema.get("properties", {})
        schema["properties"] = {**{k: v for k, v in properties.items() if k not in OutputExtensions.model_fields},
                                **{k: v for k, v in properties.items() if k in OutputExtensions.model_fields}}
        schemas[model.__name__] = schema
    return schemas


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            schema.setdefault("components", {}).setdefault("schemas", {}).update(input_schemas())
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
