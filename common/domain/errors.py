"""Failures that end a job with a fal-style error body instead of crashing anything."""

from __future__ import annotations


class JobError(Exception):
    """A job cannot be done as asked. Becomes a COMPLETED-with-error result (fal §6.1 list form)."""

    error_type = "internal_server_error"
    status_code = 422
    field = "image_url"  # the input field the error is about (FastAPI `loc`)

    def __init__(self, message: str, *, error_type: str | None = None, status_code: int | None = None,
                 field: str | None = None):
        super().__init__(message)
        self.message = message
        if error_type:
            self.error_type = error_type
        if status_code:
            self.status_code = status_code
        if field:
            self.field = field

    def detail(self) -> list[dict]:
        """FastAPI-style error list, as fal's result endpoint and webhooks carry it."""
        return [{"loc": ["body", self.field], "msg": self.message, "type": self.error_type}]


class InvalidInputError(JobError):
    error_type = "value_error"


class FileDownloadError(JobError):
    error_type = "file_download_error"


class ImageLoadError(JobError):
    error_type = "image_load_error"


class ImageTooLargeError(JobError):
    error_type = "image_too_large"


class ImageTooSmallError(JobError):
    error_type = "image_too_small"
