"""All configuration, from environment variables prefixed BIREFNET_ (or a .env file).

Every field is documented in the README's settings table; keep the two in step
(tests/test_settings_doc.py checks that every field appears there).
"""

from __future__ import annotations

import json
from functools import cached_property
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from common.variants import VariantRegistry


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BIREFNET_", env_file=".env", extra="ignore")

    # --- Broker and job records ---
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis for Celery queues and job records.")
    visibility_timeout: int = Field(
        60, description="Seconds before an unacknowledged job is handed to another worker (a killed worker's "
        "job comes back after this). A live worker's job is protected by its lease, so this may be short."
    )
    unacked_restore_interval: float = Field(
        5.0, description="How often (s) workers look for unacknowledged jobs whose visibility timeout passed."
    )
    job_lease_seconds: int = Field(30, description="Lease a worker holds on a running job, renewed while it runs.")
    job_record_ttl: int = Field(7 * 24 * 3600, description="Seconds job records (status, logs, result) are kept.")
    max_job_attempts: int = Field(3, description="Deliveries of one job before it is ended as failed (poison job).")

    # --- S3 / SQS ---
    aws_region: str = Field("us-east-1", description="AWS region for S3 and SQS.")
    s3_endpoint_url: str | None = Field(None, description="S3 endpoint (unset for AWS; MinIO or moto URL otherwise).")
    sqs_endpoint_url: str | None = Field(None, description="SQS endpoint (unset for AWS).")
    input_bucket: str = Field("birefnet-input", description="Bucket whose uploads become jobs.")
    output_bucket: str = Field("birefnet-output", description="Bucket for cut-outs, masks and result documents.")
    output_prefix: str = Field("results/", description="Key prefix of everything written to the output bucket.")
    sqs_queue_url: str | None = Field(None, description="SQS queue receiving the input bucket's event notifications.")
    result_url_style: Literal["presigned", "s3", "public"] = Field(
        "presigned", description="How result documents name output files: presigned HTTPS URLs, s3:// URIs, "
        "or public_base_url + key."
    )
    presigned_url_ttl: int = Field(7 * 24 * 3600, description="Lifetime (s) of presigned output URLs (SigV4 max: 7 days).")
    public_base_url: str = Field("", description="Base URL of the output bucket when result_url_style is 'public'.")
    sqs_wait_seconds: int = Field(10, description="SQS long-poll wait per receive call.")
    image_suffixes: Annotated[tuple[str, ...], NoDecode] = Field(
        (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"),
        description="Object key suffixes (case-insensitive) treated as images; other keys are ignored.",
    )
    prefix_defaults: dict[str, dict[str, object]] = Field(
        default_factory=dict,
        description='Per key-prefix job defaults, JSON, e.g. {"portraits/": {"model": "Portrait"}}. '
        "The longest matching prefix wins; object metadata overrides.",
    )
    default_endpoint: Literal["v1", "v2"] = Field("v2", description="fal endpoint whose schema S3-event jobs follow.")

    # --- Worker ---
    worker_variants: Annotated[tuple[str, ...], NoDecode] = Field(("general-light",), description="Variant ids this worker serves.")
    device: str = Field("auto", description="'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:1'...")
    weights_cache_dir: str = Field("~/.cache/birefnet", description="Where downloaded checkpoints are kept.")
    weights_fallback: Literal["none", "recipe"] = Field(
        "none", description="If a variant's checkpoint cannot be loaded: fail ('none') or run with untrained "
        "recipe weights ('recipe', demos only; every log line and result says so)."
    )
    variant_overrides: dict[str, dict] = Field(
        default_factory=dict,
        description='JSON {variant_id: {field: value}} adding or changing variants, e.g. '
        '{"general-light": {"weights": "/models/BiRefNet.safetensors"}}.',
    )
    torch_threads: int = Field(0, description="CPU threads for torch (0: torch's default).")
    ready_file: str = Field("/tmp/birefnet-worker-ready", description="Written once models are loaded (readiness probe).")
    max_input_bytes: int = Field(50 * 1024 * 1024, description="Largest input image accepted, in bytes.")
    max_input_pixels: int = Field(64_000_000, description="Largest decoded input image, in pixels.")
    http_timeout: float = Field(20.0, description="Timeout (s) for downloading image URLs.")
    webhook_timeout: float = Field(15.0, description="Timeout (s) of one webhook delivery attempt.")

    @field_validator("output_prefix")
    @classmethod
    def _prefix_slash(cls, value: str) -> str:
        return value if not value or value.endswith("/") else value + "/"

    @field_validator("worker_variants", "image_suffixes", mode="before")
    @classmethod
    def _split_csv(cls, value: object) -> object:
        # Accept "a,b" as well as JSON lists from the environment.
        if isinstance(value, str) and not value.lstrip().startswith("["):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        if isinstance(value, str):
            return tuple(json.loads(value))
        return value

    @cached_property
    def variants(self) -> VariantRegistry:
        return VariantRegistry.with_overrides(self.variant_overrides)


def get_settings() -> Settings:
    return Settings()
