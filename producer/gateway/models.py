"""Response shapes, declared for the OpenAPI document (handlers build the JSON themselves)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from producer.gateway.parsing import CONTENT_TYPE_PATTERN


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


class UploadInitiate(BaseModel):
    content_type: str = Field("application/octet-stream", pattern=CONTENT_TYPE_PATTERN,
                              description="MIME type the upload will be sent with.")
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
