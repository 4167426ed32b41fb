"""The browser pages (`/playground`, `/playground/ops`; files in `web/`, served without auth: every API
call they make carries the key the user types in), the input fields they offer, and the ops status JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel
from starlette.responses import FileResponse, Response

from common.domain.schemas import INPUT_MODELS
from common.domain.video import BiRefNetVideoInput
from gateway.context import gateway
from gateway.models import ERRORS, ErrorBody
from gateway.responses import FalError, fal_json
from gateway.security import Admin
from ops.status import gather_status

router = APIRouter(tags=["playground"])
WEB_DIR = Path(__file__).resolve().parent / "web"
PAGES = {"": "playground.html", "ops": "ops.html"}
ASSETS = {"playground.js", "ops.js", "common.js", "style.css"}  # what /playground/<name> may serve
APP_IDS = {"v1": "fal-ai/birefnet", "v2": "fal-ai/birefnet/v2", "v2/video": "fal-ai/birefnet/v2/video"}
# Security headers for the pages: scripts only from this origin, images from anywhere (outputs may be
# presigned S3 URLs on another host), no framing.
PAGE_HEADERS = {
    "content-security-policy": "default-src 'self'; img-src * data: blob:; connect-src 'self'; "
    "media-src * data: blob:; style-src 'self'; script-src 'self'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "cache-control": "no-cache",
}


def _file(name: str) -> Response:
    return FileResponse(WEB_DIR / name, headers=PAGE_HEADERS)


@router.get("/playground", include_in_schema=False)
async def playground_page() -> Response:
    return _file(PAGES[""])


@router.get("/playground/options.json")
async def playground_options(request: Request) -> Response:
    """Input fields per endpoint (choices and defaults) and the variant serving each model."""
    registry = gateway(request).settings.variants
    endpoints = {}
    schemas: dict[str, type[BaseModel]] = {**INPUT_MODELS, "v2/video": BiRefNetVideoInput}
    for endpoint, schema in schemas.items():
        fields = {}
        for name, field in schema.model_fields.items():
            if name in ("image_url", "video_url"):
                continue
            annotation = field.annotation
            choices = (
                [member.value for member in annotation]
                if isinstance(annotation, type) and hasattr(annotation, "__members__")
                else None
            )
            default = getattr(field.default, "value", field.default)
            fields[name] = {"default": default, "choices": choices, "description": field.description or ""}
        variants: dict[str, str | None] = {}
        for model in fields["model"]["choices"]:
            try:
                variants[model] = registry.by_model_name(endpoint.split("/")[0], model).id  # type: ignore[arg-type]
            except KeyError:
                variants[model] = None
        video = endpoint == "v2/video"
        # The page's one format select and input URL field map onto each endpoint's own names.
        endpoints[endpoint] = {
            "app_id": APP_IDS[endpoint],
            "fields": fields,
            "variants": variants,
            "url_field": "video_url" if video else "image_url",
            "format_field": "video_output_type" if video else "output_format",
            "resolution_limits": {"2304x2304": ["General Use (Dynamic)"]},
        }
    return fal_json({"endpoints": endpoints, "auth": gateway(request).settings.gateway_auth})


@router.get("/playground/{name}", include_in_schema=False)
async def playground_asset(name: str) -> Response:
    if name in PAGES:
        return _file(PAGES[name])
    if name in ASSETS:
        return _file(name)
    raise FalError(404, {"detail": "Not found"})


@router.get(
    "/admin/ops/status",
    tags=["ops"],
    responses={**ERRORS, 403: {"model": ErrorBody, "description": "Not an admin key"}},
)
async def ops_status(
    request: Request,
    caller: Admin,
    minutes: Annotated[float, Query(gt=0, le=7 * 24 * 60)] = None,
    all_variants: Annotated[bool, Query(alias="all")] = False,
) -> Response:
    """Queues per variant, workers and their variants, throughput and latency over the window, webhook
    failures and dead letters: the data of `python -m ops status --json`."""
    gw = gateway(request)
    window = minutes * 60 if minutes else None
    data = await run_in_threadpool(gather_status, gw.redis, gw.settings, window=window, show_all=all_variants)
    names = {v.id: [f"{e}: {n}" for e, n in v.fal_names.items()] for v in gw.settings.variants}
    for variant, figures in data["variants"].items():
        figures["fal_models"] = names.get(variant, [])
    return fal_json(data)
