"""Extension input fields beyond fal's schema: background, crop to subject, JPEG/AVIF output. fal's clients
pass unknown fields through, so these work from every client and bucket uploads (`x-amz-meta-*`) alike;
errors read like fal's FastAPI ones. Pure Python: the gateway and producer import this (no numpy).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from pydantic import BaseModel, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

HEX_COLOR = re.compile(r"^#(?P<rgb>[0-9a-fA-F]{6})(?P<a>[0-9a-fA-F]{2})?$")
_MARGIN = re.compile(r"^\s*(?P<value>\d+(?:\.\d+)?)\s*(?P<unit>px|%)?\s*$")
_RATIO = re.compile(r"^\s*(?P<w>\d+(?:\.\d+)?)\s*[:/x]\s*(?P<h>\d+(?:\.\d+)?)\s*$")
MAX_MARGIN_PIXELS = 4096
MAX_MARGIN_PERCENT = 200.0
MAX_ASPECT = 20.0  # 20:1 either way; beyond that the "crop" is mostly padding
LOSSY_FORMATS = ("jpeg", "avif")  # masks stay PNG with these: a mask must be exact


class BackgroundFit(enum.StrEnum):
    COVER = "cover"  # scaled to fill the output, centred, the overflow cut off
    CONTAIN = (
        "contain"  # scaled to fit inside, centred; the rest shows background_color (or stays transparent)
    )
    STRETCH = "stretch"  # resized to the output's size, aspect ratio ignored


def parse_hex_color(text: str) -> tuple[int, int, int, int]:
    """'#rrggbb' or '#rrggbbaa' -> (r, g, b, a), each 0-255."""
    match = HEX_COLOR.match(text.strip())
    if not match:
        raise ValueError(f"not a #rrggbb or #rrggbbaa colour: {text!r}")
    rgb = match.group("rgb")
    alpha = match.group("a") or "ff"
    return int(rgb[0:2], 16), int(rgb[2:4], 16), int(rgb[4:6], 16), int(alpha, 16)


@dataclass(frozen=True)
class Margin:
    """Space added around the subject's box: pixels, or percent of the box's width (left/right) and
    height (top/bottom)."""

    value: float
    percent: bool

    def pixels(self, box_width: int, box_height: int) -> tuple[int, int]:
        if not self.percent:
            return int(self.value), int(self.value)
        return round(box_width * self.value / 100), round(box_height * self.value / 100)


def parse_margin(value: str | int | float) -> Margin:
    """`24`, `"24"`, `"24px"` (pixels) or `"10%"` (of the subject's size)."""
    if isinstance(value, bool):
        raise ValueError("crop_margin must be a number of pixels or a percentage such as '10%'")
    match = _MARGIN.match(repr(value) if isinstance(value, int | float) else value)
    if not match:
        raise ValueError(
            f"crop_margin must be pixels (e.g. 24 or '24px') or a percentage (e.g. '10%'), got {value!r}"
        )
    number, percent = float(match.group("value")), match.group("unit") == "%"
    if percent and number > MAX_MARGIN_PERCENT:
        raise ValueError(f"crop_margin may be at most {MAX_MARGIN_PERCENT:g}%")
    if not percent and (number > MAX_MARGIN_PIXELS or number != int(number)):
        raise ValueError(f"crop_margin in pixels must be a whole number from 0 to {MAX_MARGIN_PIXELS}")
    return Margin(number, percent)


def parse_aspect_ratio(value: str | int | float) -> float:
    """`"16:9"`, `"4/5"`, `"1x1"` or a number (width / height) -> width / height."""
    if isinstance(value, bool):
        raise ValueError("crop_aspect_ratio must be 'W:H' (e.g. '1:1', '16:9') or a positive number")
    if isinstance(value, int | float):
        ratio = float(value)
    else:
        match = _RATIO.match(value)
        try:
            ratio = float(match.group("w")) / float(match.group("h")) if match else float(value)
        except (ValueError, ZeroDivisionError):
            ratio = 0.0
    if not (1 / MAX_ASPECT <= ratio <= MAX_ASPECT):
        raise ValueError(
            f"crop_aspect_ratio must be 'W:H' (e.g. '1:1', '16:9') or a number, between "
            f"1:{MAX_ASPECT:g} and {MAX_ASPECT:g}:1; got {value!r}"
        )
    return ratio


def _value_error(message: str) -> PydanticCustomError:
    return PydanticCustomError("value_error", "Value error, {reason}", {"reason": message})


class OutputExtensions(BaseModel):
    """The extension fields and their rules; inherited by the fal inputs, the job parameters and the
    compose body."""

    background_color: str | None = Field(
        None,
        description="Composite the cut-out onto this colour: CSS hex `#rrggbb` (opaque: the output has no "
        "alpha) or `#rrggbbaa`. With background_image_url and fit `contain`: the colour around the image.",
        examples=["#ffffff", "#00000080"],
    )
    background_image_url: str | None = Field(
        None,
        description="Composite the cut-out onto this image (http(s), data URI, s3://; fetched with the "
        "same guards and limits as image_url; its own transparency is ignored).",
        examples=["https://example.com/studio-backdrop.jpg"],
    )
    background_fit: BackgroundFit = Field(
        BackgroundFit.COVER,
        description="How background_image_url fills the output: `cover` (fill, centred, "
        "overflow cut), `contain` (fit inside; background_color or transparency around it), `stretch`.",
    )
    crop_to_subject: bool = Field(
        False,
        description="Trim the output to the subject: the bounding box of the mask at crop_threshold, plus "
        "crop_margin, grown to crop_aspect_ratio (centred). Width/height in the result are the output's.",
    )
    crop_margin: str | int | float = Field(
        0,
        description='Margin around the subject: pixels (`24`, `"24px"`) or percent of the subject\'s size '
        '(`"10%"`). Areas beyond the input show the background (or are transparent).',
        examples=["10%", 24],
    )
    crop_aspect_ratio: str | float | None = Field(
        None,
        description='Output aspect ratio after cropping, `W:H` (e.g. `"1:1"`, `"4:5"`) or width/height; '
        "the box grows (never cuts the subject) around its centre.",
        examples=["1:1", "16:9"],
    )
    crop_threshold: float = Field(
        0.5, gt=0.0, le=1.0, description="Mask level (0-1] that counts as subject for crop_to_subject."
    )

    @field_validator("background_color")
    @classmethod
    def _hex_color(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not HEX_COLOR.match(value.strip()):
            raise PydanticCustomError(
                "color_format", "Value should be a CSS hex colour '#rrggbb' or '#rrggbbaa'", {"input": value}
            )
        return value.strip().lower()

    @field_validator("background_image_url")
    @classmethod
    def _background_scheme(cls, value: str | None) -> str | None:
        if value is None:
            return None
        scheme = value.split(":", 1)[0].lower() if ":" in value else ""
        if scheme not in ("http", "https", "data", "s3"):
            raise PydanticCustomError(
                "url_scheme", "URL scheme should be 'http', 'https', 'data' or 's3'", {"scheme": scheme}
            )
        return value

    @field_validator("crop_margin")
    @classmethod
    def _margin(cls, value: str | int | float) -> str | int | float:
        try:
            parse_margin(value)
        except ValueError as exc:
            raise _value_error(str(exc)) from None
        return value

    @field_validator("crop_aspect_ratio")
    @classmethod
    def _ratio(cls, value: str | float | None) -> str | float | None:
        if value is None:
            return None
        try:
            parse_aspect_ratio(value)
        except ValueError as exc:
            raise _value_error(str(exc)) from None
        return value

    # Cross-field rules sit on fields of the subclasses (declared after these), so that their errors carry
    # the field's `loc` as FastAPI's would; `info.data` holds the extension fields by then.
    @field_validator("output_format", check_fields=False)
    @classmethod
    def _jpeg_needs_opaque_background(cls, value, info: ValidationInfo):
        if str(value) == "jpeg" and not opaque_background(info.data):
            raise _value_error(
                "output_format 'jpeg' has no alpha channel: it needs an opaque background "
                "(background_color '#rrggbb', or background_image_url with fit 'cover' or 'stretch')"
            )
        return value

    @field_validator("mask_only", check_fields=False)
    @classmethod
    def _mask_only_alone(cls, value: bool, info: ValidationInfo) -> bool:
        if value and (info.data.get("background_color") or info.data.get("background_image_url")):
            raise _value_error(
                "mask_only returns the mask alone: it cannot be combined with background_color "
                "or background_image_url"
            )
        return value

    # -- derived -------------------------------------------------------------------------------

    @property
    def has_background(self) -> bool:
        return self.background_color is not None or self.background_image_url is not None

    @property
    def opaque_background(self) -> bool:
        """True when the composited output covers every pixel: it then carries no alpha channel."""
        return opaque_background(self.__dict__)

    @property
    def extended(self) -> bool:
        """True when anything beyond fal's rendering is asked for."""
        fmt = str(getattr(self, "output_format", "png"))
        return self.has_background or self.crop_to_subject or fmt in LOSSY_FORMATS


def opaque_background(fields: dict) -> bool:
    """Whether the background named by these (validated) fields covers every output pixel."""
    color = fields.get("background_color")
    color_opaque = color is not None and parse_hex_color(color)[3] == 255
    if fields.get("background_image_url") is not None:
        return str(fields.get("background_fit", BackgroundFit.COVER)) != BackgroundFit.CONTAIN or color_opaque
    return color_opaque
