"""`fal-ai/birefnet/v2/video`: input and output schemas, and the video options a job carries.

fal's fields, enum values and defaults (model, operating_resolution, output_mask, refine_foreground,
sync_mode, video_output_type, video_quality, video_write_mode; checked against fal's published schema of
the endpoint), plus one extension: `background_color`, the colour
a cutout is laid on in outputs without alpha (MP4, GIF). Pure Python (the gateway imports it)."""

from __future__ import annotations

import enum

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from common.domain.extensions import parse_hex_color
from common.domain.schemas import ModelV2, ResolutionV2

# Bucket upload keys treated as videos (GIFs stay images: the image endpoints take them).
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".webm", ".mkv", ".avi")


class VideoOutputType(enum.StrEnum):
    X264 = "X264 (.mp4)"  # no alpha: the cutout is laid on background_color
    VP9 = "VP9 (.webm)"  # VP9 with an alpha plane
    PRORES4444 = "PRORES4444 (.mov)"  # ProRes 4444 with alpha
    GIF = "GIF (.gif)"  # palette; transparent where the mask is below half


class VideoQuality(enum.StrEnum):
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    MAXIMUM = "maximum"


class VideoWriteMode(enum.StrEnum):
    FAST = "fast"
    BALANCED = "balanced"
    SMALL = "small"


class BiRefNetVideoInput(BaseModel):
    """`fal-ai/birefnet/v2/video` input."""

    video_url: str = Field(
        description="The video whose background is removed: http(s) URL, s3:// or data URI."
    )
    model: ModelV2 = Field(ModelV2.GENERAL_LIGHT, description="The BiRefNet model (as fal-ai/birefnet/v2).")
    operating_resolution: ResolutionV2 = Field(
        ResolutionV2.R1024,
        description="The size the network runs at; 2304x2304 only with 'General Use (Dynamic)'.",
    )
    output_mask: bool = Field(False, description="Also return the mask as a grey video (mask_video).")
    refine_foreground: bool = Field(
        True, description="Refine the foreground's colours along the mask's edge."
    )
    sync_mode: bool = Field(False, description="Return the videos as data URIs; nothing is stored.")
    video_output_type: VideoOutputType = Field(
        VideoOutputType.X264, description="Container and codec of the outputs."
    )
    video_quality: VideoQuality = Field(VideoQuality.HIGH, description="Encoding quality of the outputs.")
    video_write_mode: VideoWriteMode = Field(
        VideoWriteMode.BALANCED, description="Encoder speed against file size: fast, balanced or small."
    )
    background_color: str = Field(
        "#000000",
        description="Extension: the colour under the cutout in outputs without alpha (X264, and GIF "
        "where the mask is half-opaque or more is kept), #rrggbb.",
    )

    @field_validator("video_url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        scheme = value.split(":", 1)[0].lower() if ":" in value else ""
        if scheme not in ("http", "https", "data", "s3"):
            raise PydanticCustomError(
                "url_scheme", "URL scheme should be 'http', 'https', 'data' or 's3'", {"scheme": scheme}
            )
        return value

    @field_validator("background_color")
    @classmethod
    def _colour(cls, value: str) -> str:
        try:
            parse_hex_color(value)
        except ValueError as exc:
            raise PydanticCustomError("value_error", "Value error, {error}", {"error": str(exc)}) from None
        return value


class VideoOptions(BaseModel):
    """What a worker needs beyond JobParams to write a video job's outputs (JobSpec.extra['video'])."""

    model_config = ConfigDict(frozen=True)

    output_type: str = VideoOutputType.X264.value
    quality: str = VideoQuality.HIGH.value
    write_mode: str = VideoWriteMode.BALANCED.value
    background_color: str = "#000000"

    @classmethod
    def from_input(cls, data: BiRefNetVideoInput) -> VideoOptions:
        return cls(
            output_type=data.video_output_type.value,
            quality=data.video_quality.value,
            write_mode=data.video_write_mode.value,
            background_color=data.background_color,
        )


class VideoFile(BaseModel):
    """fal's VideoFile as it appears in outputs."""

    url: str
    content_type: str
    file_name: str
    file_size: int
    width: int | None = None
    height: int | None = None
    fps: float | None = None
    duration: float | None = None
    num_frames: int | None = None


class BiRefNetVideoOutput(BaseModel):
    video: VideoFile
    mask_video: VideoFile | None = None
