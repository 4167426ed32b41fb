"""One builder for the job specs the state tests create (a fresh request id, its output prefix)."""

from __future__ import annotations

import uuid
from typing import Any

from common.domain.schemas import JobParams, JobSpec


def job_spec(variant: str = "general-light", *, image_url: str = "s3://b/k.png", **fields: Any) -> JobSpec:
    """A JobSpec with a fresh request id; `fields`: any other JobSpec field (priority, webhook_url, owner,
    extra, created_at, ...)."""
    rid = str(uuid.uuid4())
    return JobSpec(
        request_id=rid,
        variant=variant,
        image_url=image_url,
        params=JobParams(),
        output_prefix=f"results/requests/{rid}/",
        **fields,
    )
