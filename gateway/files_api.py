"""Client-side uploads (docs/api.md#uploads) and gateway-served files: upload initiate (a presigned S3 PUT),
auth token + `/files/upload` (Python's default upload), and `/objects/{key}` behind signed URLs.
Uploads live under the key's own prefix (`files/<hash of key id>/`), which only that key may name as input."""

from __future__ import annotations

import re
import time
import uuid
from datetime import UTC, datetime
from typing import Annotated

from botocore.exceptions import ClientError
from fastapi import APIRouter, Header, Query, Request
from fastapi.concurrency import iterate_in_threadpool, run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import ValidationError
from starlette.responses import Response

from common.adapters.storage import uploads_prefix
from common.domain.auth import Principal, credential_from_header
from common.domain.signed_urls import make_token, object_url_valid, read_token
from common.state import keys
from gateway.context import Gateway, gateway
from gateway.models import (
    ERRORS,
    UPLOAD_TYPES,
    ErrorBody,
    FileUploaded,
    UploadInitiate,
    UploadInitiated,
    UploadToken,
    ValidationErrorBody,
    upload_type,
)
from gateway.parsing import json_object_body, lifecycle_seconds, valid_content_type
from gateway.responses import FalError, fal_json
from gateway.security import Caller, principal
from gateway.urls import public_base
from producer.admission import validation_details

router = APIRouter(tags=["files"])
UPLOAD_URL_TTL = 3600
TOKEN_TTL = 3600
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
# What served files may do in a browser: nothing. A file opened from its URL runs no script, loads nothing
# and is not sniffed into HTML, whatever it holds (the gateway's origin also serves the playground).
SERVED_FILE_HEADERS = {
    "x-content-type-options": "nosniff",
    "content-security-policy": "default-src 'none'; sandbox",
}


def upload_key(gw: Gateway, owner: str, file_name: str) -> str:
    name = _UNSAFE.sub("_", file_name.rsplit("/", 1)[-1])[:120].strip("._") or "file"
    return f"{uploads_prefix(gw.settings, owner)}{uuid.uuid4().hex}/{name}"


def schedule_deletion(gw: Gateway, key: str, ttl: int | None) -> None:
    gw.redis.zadd(keys.OUTPUTS, {f"obj:{key}": time.time() + (ttl or gw.settings.gateway_output_retention)})


_INITIATE_BODY = {
    "requestBody": {
        "required": False,
        "content": {"application/json": {"schema": UploadInitiate.model_json_schema()}},
    }
}


@router.post(
    "/rest/storage/upload/initiate",
    response_model=UploadInitiated,
    openapi_extra=_INITIATE_BODY,
    responses={
        **ERRORS,
        400: {"model": ErrorBody, "description": "Malformed lifecycle header"},
        422: {"model": ValidationErrorBody, "description": "Body is not a valid JSON object"},
    },
)
async def upload_initiate(
    request: Request,
    caller: Caller,
    storage_type: Annotated[str, Query()] = None,
    lifecycle: Annotated[str, Header(alias="x-fal-object-lifecycle-preference")] = None,
) -> Response:
    """Any `storage_type` (fal-cdn-v3, gcs) is served the same way: S3 in our deployment."""
    gw = gateway(request)
    data = json_object_body(await request.body())  # a missing body means the defaults
    try:
        spec = UploadInitiate.model_validate(data)
    except ValidationError as exc:
        raise FalError(422, {"detail": validation_details(exc)}) from None
    key = upload_key(gw, caller.key_id, spec.file_name)
    ttl = lifecycle_seconds(lifecycle)

    def initiate() -> dict:
        bucket = gw.settings.output_bucket
        schedule_deletion(gw, key, ttl)
        return {
            "upload_url": gw.objects.presigned_put(bucket, key, spec.content_type, UPLOAD_URL_TTL),
            "file_url": gw.objects.url_for(bucket, key, ttl=ttl, api=True),
        }

    return fal_json(await run_in_threadpool(initiate))


@router.post("/rest/storage/auth/token", response_model=UploadToken, responses=ERRORS)
async def upload_token(
    request: Request, caller: Caller, storage_type: Annotated[str, Query()] = None
) -> Response:
    gw = gateway(request)
    token, expires = make_token(await run_in_threadpool(lambda: gw.secret), caller.key_id, TOKEN_TTL)
    return fal_json(
        {
            "token": token,
            "token_type": "Bearer",
            "base_url": public_base(request, gw.settings),
            "expires_at": datetime.fromtimestamp(expires, UTC).isoformat(),
        }
    )


async def uploader(request: Request, authorization: str | None) -> Principal:
    """An upload token from /rest/storage/auth/token, or an API key."""
    gw = gateway(request)
    credential = credential_from_header(authorization)
    owner = read_token(await run_in_threadpool(lambda: gw.secret), credential) if credential else None
    if owner is not None:
        return Principal(key_id=owner, user_id=owner)
    return await principal(request, authorization)


@router.post(
    "/files/upload",
    response_model=FileUploaded,
    responses={
        **ERRORS,
        400: {"model": ErrorBody, "description": "No body, or a malformed lifecycle header"},
        415: {"model": ErrorBody, "description": "A Content-Type that is not an input image or video type"},
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary", "minLength": 1}}
            },
            # Image and video types (and unlabelled bytes) are taken. Not declared as */*: fuzzers then
            # serialise the bytes
            # as a form, i.e. send an empty body.
            "description": "The file's bytes, with its own Content-Type: one of "
            f"{', '.join(sorted(UPLOAD_TYPES))}.",
        }
    },
)
async def files_upload(
    request: Request,
    authorization: Annotated[
        str,
        Header(
            description="`Bearer <upload token>` from /rest/storage/auth/token, "
            "or an API key as on every route"
        ),
    ] = None,
    content_type: Annotated[str, Header()] = None,
    file_name: Annotated[str, Header(alias="X-Fal-File-Name")] = None,
    lifecycle: Annotated[str, Header(alias="X-Fal-Object-Lifecycle")] = None,
    lifecycle_preference: Annotated[str, Header(alias="x-fal-object-lifecycle-preference")] = None,
) -> Response:
    """The raw bytes of one input image or video; answers the URL to use as image_url or video_url. Image
    and video types the workers decode are taken (and unlabelled bytes, stored as application/octet-stream);
    any other MIME type is a 415. A Content-Type that is not a MIME type only labels the bytes: they are
    stored as application/octet-stream."""
    gw = gateway(request)
    owner = await uploader(request, authorization)
    given = content_type.strip() if content_type and valid_content_type(content_type.strip()) else ""
    stored_type = upload_type(given) if given else "application/octet-stream"
    if stored_type is None:  # checked before the body is read: a refused upload costs no memory
        raise FalError.flat(
            415,
            f"Content-Type {given[:100]!r} is not an input image or video type (one of "
            f"{', '.join(sorted(UPLOAD_TYPES))})",
            "unsupported_media_type",
        )
    ttl = (
        lifecycle_seconds(lifecycle, "X-Fal-Object-Lifecycle")
        if lifecycle is not None
        else lifecycle_seconds(lifecycle_preference)
    )
    data = await request.body()
    if not data:
        raise FalError.flat(400, "Request body is empty: send the file's bytes", "bad_request")
    key = upload_key(gw, owner.key_id, file_name or "upload.bin")

    def store() -> str:
        bucket = gw.settings.output_bucket
        gw.objects.write(bucket, key, data, stored_type)
        schedule_deletion(gw, key, ttl)
        return gw.objects.url_for(bucket, key, ttl=ttl, api=True)

    return fal_json({"access_url": await run_in_threadpool(store)})


@router.get(
    "/objects/{key:path}",
    responses={
        200: {
            "content": {"*/*": {}},
            "description": "The file (opened as a download, in a sandbox: no script runs)",
        },
        404: {
            "model": ErrorBody,
            "description": "Unknown, expired or badly signed URL, or a malformed exp or sig",
        },
    },
)
async def get_object(
    request: Request,
    key: str,
    exp: Annotated[
        str,
        Query(
            description="Expiry, Unix seconds (ASCII digits)", json_schema_extra={"pattern": "^[0-9]{0,15}$"}
        ),
    ] = "",
    sig: Annotated[
        str,
        Query(
            description="The URL's signature (base64url)",
            json_schema_extra={"pattern": "^[A-Za-z0-9_-]{0,64}$"},
        ),
    ] = "",
) -> Response:
    """A stored file behind a signed, expiring URL (no API key: the signature is the permission)."""
    gw = gateway(request)
    secret = await run_in_threadpool(lambda: gw.secret)
    if not object_url_valid(secret, key, exp, sig):
        raise FalError(404, {"detail": "File not found or link expired"})
    try:
        obj = await run_in_threadpool(gw.objects.open, gw.settings.output_bucket, key)
    except ClientError as exc:
        raise FalError(404, {"detail": "File not found or link expired"}) from exc
    # The stored Content-Type as is (a media_type would get "; charset=utf-8" added to text types).
    stored_type = obj.content_type or "application/octet-stream"
    headers = {
        "content-length": str(obj.size),
        "cache-control": "private, max-age=3600",
        "content-type": stored_type,
        **SERVED_FILE_HEADERS,
    }
    if key.startswith(f"{gw.settings.output_prefix}files/") or upload_type(stored_type) in (
        None,
        "application/octet-stream",
    ):
        # Callers' own files (and anything not an image we made) download instead of opening in a tab.
        name = _UNSAFE.sub("_", key.rsplit("/", 1)[-1])[:120] or "file"
        headers["content-disposition"] = f'attachment; filename="{name}"'
    return StreamingResponse(iterate_in_threadpool(obj.body.iter_chunks(1 << 16)), headers=headers)
