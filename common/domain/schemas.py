"""fal's BiRefNet input/output schemas (docs/api.md#inputs) and our job spec. Enum fields use `enum.Enum` so
validation errors read exactly like fal's FastAPI ones (type "enum", "Input should be 'A', 'B' or 'C'")."""

from __future__ import annotations

import enum
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from common.domain.extensions import OutputExtensions
from common.domain.variants import RES_1024, RES_2048, RES_2304


class ModelV1(enum.StrEnum):
    GENERAL_LIGHT = "General Use (Light)"
    GENERAL_HEAVY = "General Use (Heavy)"
    PORTRAIT = "Portrait"


class ModelV2(enum.StrEnum):
    GENERAL_LIGHT = "General Use (Light)"
    GENERAL_LIGHT_2K = "General Use (Light 2K)"
    GENERAL_HEAVY = "General Use (Heavy)"
    MATTING = "Matting"
    PORTRAIT = "Portrait"
    GENERAL_DYNAMIC = "General Use (Dynamic)"


class ResolutionV1(enum.StrEnum):
    R1024 = RES_1024
    R2048 = RES_2048


class ResolutionV2(enum.StrEnum):
    R1024 = RES_1024
    R2048 = RES_2048
    R2304 = RES_2304


class OutputFormat(enum.StrEnum):
    WEBP = "webp"
    PNG = "png"
    GIF = "gif"
    JPEG = "jpeg"  # extension: only with an opaque background (common.domain.extensions)
    AVIF = "avif"  # extension: where the workers' Pillow has AVIF (else the job ends with a 422)


class BiRefNetInput(OutputExtensions):
    """`fal-ai/birefnet` (v1) input, plus our extension fields (background, crop, jpeg/avif)."""

    image_url: str = Field(description="URL (http, https, s3) or data URI of the image.")
    model: ModelV1 = ModelV1.GENERAL_LIGHT
    operating_resolution: ResolutionV1 = ResolutionV1.R1024
    output_format: OutputFormat = OutputFormat.PNG
    output_mask: bool = False
    refine_foreground: bool = True
    sync_mode: bool = False

    @field_validator("image_url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        colon = value.find(":", 0, 64)  # only the head: a data URI may be tens of MB, not to be copied
        scheme = value[:colon].lower() if colon > 0 else ""
        if scheme not in ("http", "https", "data", "s3"):
            raise PydanticCustomError(
                "url_scheme", "URL scheme should be 'http', 'https', 'data' or 's3'", {"scheme": scheme}
            )
        return value


class BiRefNetV2Input(BiRefNetInput):
    """`fal-ai/birefnet/v2` input: v1 plus more models, 2304x2304 (Dynamic only) and mask_only."""

    model: ModelV2 = ModelV2.GENERAL_LIGHT  # type: ignore[assignment]
    operating_resolution: ResolutionV2 = ResolutionV2.R1024  # type: ignore[assignment]
    mask_only: bool = False

    @field_validator("operating_resolution")
    @classmethod
    def _resolution_allowed_for_model(cls, value: ResolutionV2, info: ValidationInfo) -> ResolutionV2:
        model = info.data.get("model")
        if value == ResolutionV2.R2304 and model is not None and model != ModelV2.GENERAL_DYNAMIC:
            raise PydanticCustomError(
                "value_error",
                "Value error, 2304x2304 is only supported by the 'General Use (Dynamic)' model",
            )
        return value


INPUT_MODELS: dict[str, type[BiRefNetInput]] = {"v1": BiRefNetInput, "v2": BiRefNetV2Input}


class ImageFile(BaseModel):
    """fal's ImageFile as it appears in outputs (never `file_data`)."""

    url: str
    content_type: str
    file_name: str
    file_size: int
    width: int
    height: int


class BiRefNetOutput(BaseModel):
    image: ImageFile
    mask_image: ImageFile | None = None


class ComposeInput(OutputExtensions):
    """Body of `POST .../requests/{id}/compose`: new outputs from that request's kept mask, no network run."""

    output_format: OutputFormat = OutputFormat.PNG
    output_mask: bool = False
    refine_foreground: bool = True
    mask_only: bool = False
    sync_mode: bool = False


class JobParams(OutputExtensions):
    """The validated, endpoint-independent parameters a worker needs."""

    model_config = ConfigDict(frozen=True)

    operating_resolution: str = RES_1024
    output_format: Literal["png", "webp", "gif", "jpeg", "avif"] = "png"
    output_mask: bool = False
    refine_foreground: bool = True
    mask_only: bool = False
    sync_mode: bool = False

    @classmethod
    def from_input(
        cls, data: BiRefNetInput | ComposeInput, operating_resolution: str | None = None
    ) -> JobParams:
        return cls(
            operating_resolution=operating_resolution or data.operating_resolution.value,  # type: ignore[union-attr]
            output_format=data.output_format.value,
            output_mask=data.output_mask,
            refine_foreground=data.refine_foreground,
            mask_only=getattr(data, "mask_only", False),
            sync_mode=data.sync_mode,
            **{name: getattr(data, name) for name in OutputExtensions.model_fields},
        )


class JobSpec(BaseModel):
    """Everything a worker needs to run one job; travels in the Celery message and the job record."""

    request_id: str
    endpoint: Literal["v1", "v2"] = "v2"
    variant: str
    image_url: str
    params: JobParams
    source: Literal["s3_event", "api"] = "api"
    output_prefix: str = Field(description="Key prefix in the output bucket for this job's files.")
    input_fingerprint: str | None = Field(
        None, description="Hash of the input object version and params; equal fingerprints share results."
    )
    input_version: str | None = Field(
        None,
        description="Bucket uploads on versioned buckets: the object version the job reads (image_url "
        "ends in ?versionId=<it>).",
    )
    input_etag: str | None = Field(
        None,
        description="Bucket uploads on unversioned buckets: the ETag the upload event named; the "
        "worker reads the object only while it still has it (an overwrite supersedes the job).",
    )
    webhook_url: str | None = None
    owner: str | None = Field(None, description="API key id (gateway) or 's3' for bucket uploads.")
    priority: Literal["normal", "low"] = "normal"
    created_at: float = Field(default_factory=time.time)
    start_deadline: float | None = Field(None, description="Unix time after which the job must not start.")
    max_attempts: int | None = Field(
        None,
        ge=1,
        description="Deliveries this job may take, at most BIREFNET_MAX_JOB_ATTEMPTS (None: that "
        "setting); 1 when the caller sent x-fal-no-retry.",
    )
    extra: dict[str, Any] = Field(default_factory=dict)
    reuse_from: str | None = Field(
        None, description="Compose: render from the kept mask of this request instead of running the network."
    )
    mask_cache_scope: str | None = Field(
        None,
        description="Who may share masks with this job through the content cache ('shared', 'key:<id>', "
        "'uploads'); None: no cache.",
    )

    @property
    def queue(self) -> str:
        return f"birefnet.{self.variant}"
