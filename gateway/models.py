"""Response shapes, declared for the OpenAPI document (handlers build the JSON themselves)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class QueueSubmitted(BaseModel):
    status: Literal["IN_QUEUE"] = "IN_QUEUE"
    request_id: str
    gateway_request_id: str
    response_url: str
    status_url: str
    cancel_url: str
    queue_position: int


class LogEntry(BaseModel):
    message: str
    level: Literal["STDERR", "STDOUT", "ERROR", "INFO", "WARN", "DEBUG"]
    source: Literal["USER"] = "USER"
    timestamp: str


class QueueStatus(BaseModel):
    status: Literal["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]
    request_id: str
    response_url: str
    status_url: str
    cancel_url: str
    queue_position: int | None = Field(None, description="Only while IN_QUEUE: requests ahead (0 = next).")
    logs: list[LogEntry] | None = Field(description="null unless `logs=1`; on streams, only new entries.")
    metrics: dict[str, float] = Field(description='{"inference_time": seconds} once COMPLETED.')
    error: str | None = Field(None, description="Only on failed or cancelled requests.")
    error_type: str | None = Field(None, description="Only on failed or cancelled requests.")


class CancelStatus(BaseModel):
    status: Literal["CANCELLATION_REQUESTED", "ALREADY_COMPLETED", "NOT_FOUND"]


class ErrorBody(BaseModel):
    detail: str
    error_type: str | None = None


class ValidationErrorBody(BaseModel):
    detail: list[dict[str, Any]] = Field(description="FastAPI-style items: loc, msg, type (input, ctx).")


# Uploads are inputs: the image types the workers decode (JPEG, PNG, WebP, GIF, BMP, TIFF, AVIF), the
# video containers the video endpoint reads (what browsers and fal's clients label .mp4, .m4v, .mov, .webm,
# .mkv and .avi files), or unlabelled bytes. Anything a browser would run (HTML, SVG, XML, JavaScript) is
# refused.
UPLOAD_TYPES = frozenset(
    {
        "image/jpeg",
        "image/jpg",
        "image/pjpeg",
        "image/png",
        "image/webp",
        "image/gif",
        "image/bmp",
        "image/x-ms-bmp",
        "image/tiff",
        "image/avif",
        "application/octet-stream",
        "video/mp4",
        "video/x-m4v",
        "video/quicktime",
        "video/webm",
        "video/x-matroska",
        "video/x-msvideo",
        "video/avi",
    }
)


def upload_type(content_type: str) -> str | None:
    """The MIME type to store an upload under (parameters dropped, lower case), or None when it is refused."""
    essence = content_type.split(";", 1)[0].strip().lower()
    return essence if essence in UPLOAD_TYPES else None


# The same list as a JSON-schema pattern (exact, lower case): what the initiate body's schema promises is
# exactly what it takes.
UPLOAD_TYPE_PATTERN = (
    "^(" + "|".join(sorted(t.replace(".", "[.]").replace("+", "[+]") for t in UPLOAD_TYPES)) + ")$"
)


class UploadInitiate(BaseModel):
    content_type: str = Field(
        "application/octet-stream",
        pattern=UPLOAD_TYPE_PATTERN,
        description="MIME type the upload will be sent with: an input image or video type "
        f"({', '.join(sorted(UPLOAD_TYPES))}).",
    )
    file_name: str = Field("upload.bin", max_length=1024)


class UploadInitiated(BaseModel):
    upload_url: str = Field(description="Presigned S3 PUT URL; send the bytes with the same Content-Type.")
    file_url: str = Field(description="URL of the stored file, usable as image_url.")


class UploadToken(BaseModel):
    token: str
    token_type: str = "Bearer"
    base_url: str
    expires_at: str


class FileUploaded(BaseModel):
    access_url: str


class FailedWebhooks(BaseModel):
    failed: list[dict[str, Any]]


ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "Missing or invalid API key"},
    404: {"model": ErrorBody, "description": "Unknown application or request (or another key's request)"},
}
