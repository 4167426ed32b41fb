"""Failures that end a job with a fal-style error body instead of crashing anything; each builds its own
(`body()`): the list form for what is wrong with the input, the flat form for what happened to the request."""

from __future__ import annotations


class JobError(Exception):
    """A job cannot be done as asked. Becomes a COMPLETED-with-error result (fal §6.1 list form)."""

    error_type = "internal_server_error"
    status_code = 422
    field = "image_url"  # the input field the error is about (FastAPI `loc`)

    def __init__(
        self,
        message: str,
        *,
        error_type: str | None = None,
        status_code: int | None = None,
        field: str | None = None,
    ):
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

    def body(self) -> dict:
        """The stored result (and webhook payload) of a job this error ends."""
        return {"detail": self.detail()}


class InvalidInputError(JobError):
    error_type = "value_error"


class InputErrors(JobError):
    """The 422 the model would answer, with FastAPI's exact `detail` list (one entry per problem)."""

    def __init__(self, details: list[dict]):
        super().__init__(details[0]["msg"], error_type=details[0]["type"])
        self.details = details

    def detail(self) -> list[dict]:
        return self.details


class FileDownloadError(JobError):
    error_type = "file_download_error"


class ImageLoadError(JobError):
    error_type = "image_load_error"


class ImageTooLargeError(JobError):
    error_type = "image_too_large"


class ImageTooSmallError(JobError):
    error_type = "image_too_small"


class RequestError(JobError):
    """What happened to the request, not its input: fal's flat `{detail, error_type}` body."""

    default_message = ""

    def __init__(self, message: str | None = None, **kwargs):
        super().__init__(message or self.default_message, **kwargs)

    def body(self) -> dict:
        return {"detail": self.message, "error_type": self.error_type}


class RequestTimeout(
    RequestError
):  # X-Fal-Request-Timeout passed, or the last attempt hit the run-time limit
    error_type, status_code, default_message = "request_timeout", 504, "Request timed out before it started"


class RequestCancelled(RequestError):
    error_type, status_code, default_message = "client_cancelled", 499, "Request was cancelled"


class RunnerDisconnected(RequestError):  # the job's attempts ended without a result
    error_type, status_code = "runner_disconnected", 503


class QueueUnreachable(RequestError):
    error_type, status_code, default_message = "runner_connection_error", 503, "Could not reach the job queue"


class LimitRefused(RequestError):
    """A limit of the API key or a queue cap says no (429 with Retry-After): no job is made."""

    status_code = 429

    def __init__(self, message: str, reason: str, retry_after: int):
        super().__init__(message, error_type=reason)
        self.reason, self.retry_after = reason, retry_after  # Retry-After: seconds
