"""A small cog-like predictor around the BiRefNet network, plus output rendering.

The worker's per-job path:

    image = decode_image(data, max_pixels=...)                       # worker.imaging
    (mask,) = predictor.predict_masks([image], (width, height))      # float32 HxW in [0, 1]
    rendered = predictor.render_outputs(image, mask, output_format="png", output_mask=False,
                                        refine_foreground=True, mask_only=False)

Pass one `StageTimings` as `timings=` to both calls (and wrap the decode in
`timings.stage("decode")`) to get per-stage seconds for the job's log.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from common.errors import InvalidInputError
from common.settings import Settings
from common.variants import VariantSpec
from worker.allocator import retain_freed_memory
from worker.imaging import (
    OUTPUT_FORMATS,
    EncodedImage,
    encode_image,
    mask_to_image,
    refined_colours,
    rgba_from,
)
from worker.loading import LoadedNetwork, load_network
from worker.patch_order_check import PatchOrderReport, log_patch_order, self_check

log = logging.getLogger(__name__)

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
SIZE_MULTIPLE = 32  # Swin patch embedding (4) x three 2x patch merges
MAX_SIDE = 4096
CPU_WARMUP_RESOLUTION = (64, 64)
DEFAULT_PNG_COMPRESS_LEVEL = 3
DEFAULT_WEBP_QUALITY = 90
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


# --------------------------------------------------------------------------------------------
# Small value types
# --------------------------------------------------------------------------------------------


def parse_resolution(text: str) -> tuple[int, int]:
    """'1024x1024' -> (width, height); both multiples of 32, at most 4096."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text or "")
    if not match:
        raise InvalidInputError(f"operating_resolution {text!r} is not WIDTHxHEIGHT", field="operating_resolution")
    return check_resolution((int(match.group(1)), int(match.group(2))))


def check_resolution(resolution: tuple[int, int]) -> tuple[int, int]:
    width, height = resolution
    for side in (width, height):
        if side <= 0 or side % SIZE_MULTIPLE or side > MAX_SIDE:
            raise InvalidInputError(
                f"operating resolution {width}x{height}: each side must be a multiple of {SIZE_MULTIPLE} "
                f"between {SIZE_MULTIPLE} and {MAX_SIDE}",
                field="operating_resolution",
            )
    return width, height


class StageTimings:
    """Seconds spent per named stage, accumulated over calls (batches add up)."""

    STAGES = ("decode", "preprocess", "forward", "postprocess", "refine", "compose", "encode")

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started

    def as_dict(self, digits: int = 4) -> dict[str, float]:
        return {name: round(value, digits) for name, value in self.seconds.items()}

    def __str__(self) -> str:
        return " ".join(f"{name}={value * 1000:.0f}ms" for name, value in self.seconds.items())


@dataclass(frozen=True)
class RenderedOutputs:
    """Encoded results of one job. With `mask_only`, `image` holds the mask and `mask` is None."""

    image: EncodedImage
    mask: EncodedImage | None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} was asked for, but CUDA is not available")
    return device


# --------------------------------------------------------------------------------------------
# Pre- and post-processing
# --------------------------------------------------------------------------------------------


def to_input_tensor(image: Image.Image, resolution: tuple[int, int]) -> torch.Tensor:
    """RGB image -> (3, H, W) float32, resized to (W, H) with bilinear and ImageNet-normalised
    (the reference pipeline: PIL bilinear resize, /255, (x - mean) / std in float32)."""
    resized = image if image.size == resolution else image.resize(resolution, Image.Resampling.BILINEAR)
    array = (np.asarray(resized, dtype=np.float32) / np.float32(255.0) - IMAGENET_MEAN) / IMAGENET_STD
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def mask_at_size(probabilities: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(1, h, w) probabilities -> float32 (H, W) numpy mask at `size` = (W, H), bilinear."""
    width, height = size
    if probabilities.shape[-2:] != (height, width):
        # antialias matters when the input was smaller than the operating resolution.
        probabilities = F.interpolate(probabilities[None], size=(height, width), mode="bilinear",
                                      align_corners=False, antialias=True)[0]
    return probabilities[0].clamp_(0.0, 1.0).to("cpu", torch.float32).numpy()


def render_outputs(
    image: Image.Image,
    mask: np.ndarray,
    *,
    output_format: str,
    output_mask: bool,
    refine_foreground: bool,
    mask_only: bool,
    device: torch.device | str | None = None,
    timings: StageTimings | None = None,
    png_compress_level: int = DEFAULT_PNG_COMPRESS_LEVEL,
    webp_quality: int = DEFAULT_WEBP_QUALITY,
) -> RenderedOutputs:
    """Encode the cut-out (RGBA, input size) and, if asked, the mask (8-bit grey), in `output_format`.

    `mask_only` returns just the mask (as `image`) and skips the foreground refinement.
    `device` runs the refinement (default: CUDA when present); `Predictor.render_outputs` passes its own.
    """
    fmt = output_format.lower()
    if fmt not in OUTPUT_FORMATS:
        raise InvalidInputError(f"output_format must be one of {OUTPUT_FORMATS}, got {output_format!r}",
                                field="output_format")
    timings = timings if timings is not None else StageTimings()
    device = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    options = {"png_compress_level": png_compress_level, "webp_quality": webp_quality}

    def encode_mask() -> EncodedImage:
        return encode_image(mask_to_image(mask), fmt, lossless=True, **options)

    if mask_only:
        with timings.stage("encode"):
            return RenderedOutputs(image=encode_mask(), mask=None)
    with timings.stage("refine"):
        colours = refined_colours(image, mask, device) if refine_foreground else np.asarray(image)
    with timings.stage("compose"):
        cutout = rgba_from(colours, mask)
    with timings.stage("encode"):
        encoded = encode_image(cutout, fmt, **options)
        encoded_mask = encode_mask() if output_mask else None
    return RenderedOutputs(image=encoded, mask=encoded_mask)


# --------------------------------------------------------------------------------------------
# Predictor
# --------------------------------------------------------------------------------------------


class Predictor:
    """One variant's network on one device: `load()` once, then `predict_masks` per batch."""

    def __init__(self, spec: VariantSpec, settings: Settings):
        self.spec = spec
        self.settings = settings
        self._device = resolve_device(settings.device)
        self._network: nn.Module | None = None
        self._loaded: LoadedNetwork | None = None
        self.patch_order_report: PatchOrderReport | None = None  # set by load(): the self-check's finding

    # -- state -----------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def untrained(self) -> bool:
        """True when running recipe weights: results must say they are not from a trained model."""
        return self._require_loaded().untrained

    @property
    def weights_description(self) -> str:
        description = self._require_loaded().description
        report = self.patch_order_report
        if report is not None and report.in_use != report.configured:
            description += f"; patch order {report.in_use} ADOPTED by the self-check (configured {report.configured})"
        return description

    @property
    def network(self) -> nn.Module:
        self._require_loaded()
        assert self._network is not None
        return self._network

    def _require_loaded(self) -> LoadedNetwork:
        if self._loaded is None:
            raise RuntimeError(f"predictor for {self.spec.id!r} is not loaded; call load() first")
        return self._loaded

    @property
    def _on_cuda(self) -> bool:
        return self._device.type == "cuda"

    @property
    def _autocast_dtype(self) -> torch.dtype | None:
        dtype = _DTYPES[self.settings.inference_dtype]
        return dtype if self._on_cuda and dtype != torch.float32 else None

    # -- loading ---------------------------------------------------------------------------

    def load(self, loaded: LoadedNetwork | None = None) -> None:
        """Weights (`loaded`, else the variant's own), device placement, eval mode, GPU tuning, the
        patch-order self-check, optional compile, warm-up forward."""
        if self.settings.torch_threads > 0:
            torch.set_num_threads(self.settings.torch_threads)
        if self.settings.retain_freed_memory:
            retain_freed_memory()
        loaded = loaded or load_network(self.spec, self.settings)
        module = loaded.module.to(self._device).eval()
        if self._on_cuda:
            torch.backends.cudnn.benchmark = True  # fixed operating resolutions: tuned kernels pay off
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            if self.settings.channels_last:
                module = module.to(memory_format=torch.channels_last)
        # Last: the fused copies are plain tensors made from the parameters, on their device.
        if self.settings.fused_inference and hasattr(module, "fuse_for_inference"):
            module.fuse_for_inference()
        self._loaded = loaded
        self._network = module
        self.patch_order_report = self_check(self)  # eager, before compile: it switches the decoder's order
        log_patch_order(self.spec.id, self.patch_order_report)
        if self.settings.compile_model:
            self._network = torch.compile(module)
        if self.settings.warmup_forward:
            self._warm_up(eager=module)
        log.info("variant %s loaded on %s%s: %s", self.spec.id, self._device,
                 f" ({self.settings.inference_dtype} autocast)" if self._autocast_dtype else "",
                 loaded.description)

    def _warm_up(self, eager: nn.Module) -> None:
        width, height = (parse_resolution(self.spec.default_resolution) if self._on_cuda
                         else CPU_WARMUP_RESOLUTION)
        dummy = torch.zeros(1, 3, height, width, device=self._device)
        started = time.perf_counter()
        try:
            self._forward(dummy)
        except Exception:
            if self._network is eager:
                raise
            log.warning("torch.compile failed at the warm-up forward; running eagerly", exc_info=True)
            self._network = eager
            self._forward(dummy)
        log.info("variant %s warm-up forward %dx%d took %.2fs", self.spec.id, width, height,
                 time.perf_counter() - started)

    # -- inference -------------------------------------------------------------------------

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        dtype = self._autocast_dtype
        with torch.inference_mode(), torch.autocast(self._device.type, dtype=dtype, enabled=dtype is not None):
            logits = self.network(batch)
        if self._on_cuda:
            torch.cuda.synchronize(self._device)  # so the stage timings mean something
        return logits

    def predict_masks(
        self,
        images: Sequence[Image.Image],
        resolution: tuple[int, int],
        *,
        timings: StageTimings | None = None,
    ) -> list[np.ndarray]:
        """Masks (float32 HxW in [0, 1], each at its image's original size) for RGB images.

        Every image is resized to the operating `resolution` = (width, height), so images go
        through the network together, `max_batch_size` at a time; each probability map is then
        resized back to its image's size with bilinear interpolation.
        """
        width, height = check_resolution(resolution)
        timings = timings if timings is not None else StageTimings()
        masks: list[np.ndarray] = []
        step = self.settings.max_batch_size
        for start in range(0, len(images), step):
            chunk = images[start:start + step]
            with timings.stage("preprocess"):
                batch = torch.stack([to_input_tensor(image, (width, height)) for image in chunk])
                batch = batch.to(self._device, non_blocking=True)
                if self._on_cuda and self.settings.channels_last:
                    batch = batch.contiguous(memory_format=torch.channels_last)
            with timings.stage("forward"):
                logits = self._forward(batch)
            with timings.stage("postprocess"), torch.inference_mode():
                probabilities = logits.float().sigmoid()
                masks.extend(mask_at_size(p, image.size) for p, image in zip(probabilities, chunk, strict=True))
        return masks

    def render_outputs(
        self,
        image: Image.Image,
        mask: np.ndarray,
        *,
        output_format: str,
        output_mask: bool,
        refine_foreground: bool,
        mask_only: bool,
        timings: StageTimings | None = None,
    ) -> RenderedOutputs:
        """`render_outputs` on this predictor's device with the configured encoder settings."""
        return render_outputs(
            image, mask, output_format=output_format, output_mask=output_mask,
            refine_foreground=refine_foreground, mask_only=mask_only, device=self._device, timings=timings,
            png_compress_level=self.settings.png_compress_level, webp_quality=self.settings.webp_quality,
        )
