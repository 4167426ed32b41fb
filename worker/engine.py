"""A small cog-like predictor around the BiRefNet network (the output stage is worker.rendering).

The worker's per-job path, split so that only the forward runs on the batcher's thread:

    image = decode_rgb(data, max_pixels=..., max_side=...)           # worker.pixels: (H, W, 3) uint8
    prepared = predictor.prepare(image, (width, height))              # job thread: resize + normalise
    (logits,) = predictor.forward([prepared])                         # batcher thread: the network only
    mask = predictor.mask_for(logits, prepared)                       # job thread: sigmoid + resize back
    rendered = predictor.render_outputs(image, mask, output_format="png", output_mask=False,
                                        refine_foreground=True, mask_only=False)

`predict_masks` does the first three for a list of images (tests, benchmarks, tools). On CUDA the
decoded image goes to the device once (pinned, non-blocking) and the mask stays there through the
resize back, refinement and composition; only the final 8-bit RGBA and mask come back.

Pass one `StageTimings` as `timings=` to both calls (and wrap the decode in
`timings.stage("decode")`) to get per-stage seconds for the job's log.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from common.domain.errors import InvalidInputError
from common.domain.variants import VariantSpec
from common.settings import WorkerSettings
from worker import pixels
from worker.allocator import retain_freed_memory
from worker.loading import LoadedNetwork, load_network
from worker.null_model import NULL_MODEL_BANNER, NullNetwork
from worker.patch_order_check import PatchOrderReport, log_patch_order, self_check
from worker.rendering import RenderedOutputs, render_outputs
from worker.timings import StageTimings

# The widest decoder feature map at the input's resolution (Swin-T: 96 channels, Swin-L: 192; margin).
FULL_RES_CHANNELS = 256

log = logging.getLogger(__name__)

SIZE_MULTIPLE = 32  # Swin patch embedding (4) x three 2x patch merges
MAX_SIDE = 4096
CPU_WARMUP_RESOLUTION = (64, 64)
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


# --- Small value types ---


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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} was asked for, but CUDA is not available")
    return device


# --- Pre- and post-processing ---

ImageLike = Image.Image | np.ndarray  # a decoded RGB image: PIL, or (H, W, 3) uint8


@dataclass
class PreparedImage:
    """One image ready for the network: its input at the operating resolution, on the device.

    `device_rgb` (CUDA only) is the decoded image uploaded once, as (3, H, W) uint8, for the
    device-side refinement and composition."""

    network_input: torch.Tensor  # (3, h, w) float32, ImageNet-normalised
    size: tuple[int, int]  # (W, H) of the decoded image
    device_rgb: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)


def device_input(rgb: torch.Tensor, resolution: tuple[int, int]) -> torch.Tensor:
    """(3, H, W) uint8 on any device -> (3, h, w) float32 at `resolution`, normalised, on that device
    (antialiased bilinear when shrinking, as the area filter on the CPU path)."""
    width, height = resolution
    x = rgb.unsqueeze(0).float()
    if tuple(x.shape[-2:]) != (height, width):
        x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.as_tensor(pixels.IMAGENET_MEAN * 255.0, device=x.device).view(1, 3, 1, 1)
    std = torch.as_tensor(pixels.IMAGENET_STD * 255.0, device=x.device).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std)[0]


def device_mask_at_size(probabilities: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(1, h, w) probabilities -> float32 (H, W) mask at `size`, on the probabilities' device."""
    width, height = size
    x = probabilities.float().reshape(1, 1, *probabilities.shape[-2:])
    if tuple(x.shape[-2:]) != (height, width):
        x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return x[0, 0].clamp_(0.0, 1.0)


# --- Predictor ---


class Predictor:
    """One variant's network on one device: `load()` once, then `predict_masks` per batch (or the
    split `prepare` / `forward` / `mask_for` that the worker's batcher uses)."""

    def __init__(self, spec: VariantSpec, settings: WorkerSettings):
        self.spec = spec
        self.settings = settings
        self._device = resolve_device(settings.device)
        self._network: nn.Module | None = None
        self._loaded: LoadedNetwork | None = None
        self.patch_order_report: PatchOrderReport | None = None  # set by load(): the self-check's finding

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def untrained(self) -> bool:
        """True when running recipe weights (or the null model): results must say they are not from a
        trained model."""
        return self._require_loaded().untrained

    @property
    def null_model(self) -> bool:
        """True for the benchmark-only null model (`benchmark_null_model`): a constant mask, no network."""
        return bool(self.settings.benchmark_null_model)

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
    def _half_dtype(self) -> torch.dtype | None:
        """float16/bfloat16 on CUDA (weights are stored in it), None for float32."""
        dtype = _DTYPES[self.settings.inference_dtype]
        return dtype if self._on_cuda and dtype != torch.float32 else None

    def load(self, loaded: LoadedNetwork | None = None) -> None:
        """Weights (`loaded`, else the variant's own; the null model under `benchmark_null_model`), device
        placement and dtype, eval mode, GPU tuning, the patch-order self-check, optional compile, warm-up."""
        threads = self.settings.torch_threads
        if threads == 0 and (self._on_cuda or self.null_model):
            # torch's CPU pool would only serve tiny host-side ops here, and its idle threads spin
            # (OpenMP busy-waits) on the cores the job threads need for decoding and encoding.
            threads = 1
        if threads > 0:
            torch.set_num_threads(threads)
        if self.settings.retain_freed_memory:
            retain_freed_memory()
        if self.null_model:
            log.warning("%s: variant %s runs NO network", NULL_MODEL_BANNER, self.spec.id)
            loaded = LoadedNetwork(module=NullNetwork(), untrained=True, description=NULL_MODEL_BANNER)
        else:
            loaded = loaded or load_network(self.spec, self.settings)
        module = loaded.module.to(self._device).eval()
        if self._on_cuda:
            torch.backends.cudnn.benchmark = True  # fixed operating resolutions: tuned kernels pay off
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            if self._half_dtype is not None:
                module = module.to(self._half_dtype)  # weights in the inference dtype, not autocast
            if self.settings.channels_last:
                module = module.to(memory_format=torch.channels_last)
        # Last: the fused copies are plain tensors made from the parameters, on their device and dtype.
        fuse_for_inference = getattr(module, "fuse_for_inference", None)
        if self.settings.fused_inference and callable(fuse_for_inference):
            fuse_for_inference()
        self._loaded = loaded
        self._network = module
        self.patch_order_report = self_check(self)  # eager, before compile: it switches the decoder's order
        log_patch_order(self.spec.id, self.patch_order_report)
        if self.settings.compile_model:
            mode = self.settings.compile_mode if self.settings.compile_mode != "default" else None
            # torch.compile of a Module returns an OptimizedModule; its stub says only "callable".
            self._network = cast(nn.Module, torch.compile(module, mode=mode))
        if self.settings.warmup_forward:
            self._warm_up(eager=module)
        log.info("variant %s loaded on %s%s: %s", self.spec.id, self._device,
                 f" ({self.settings.inference_dtype} weights)" if self._half_dtype else "",
                 loaded.description)

    def warmup_shapes(self) -> list[tuple[tuple[int, int], int]]:
        """(resolution, batch size) pairs the warm-up runs: on CUDA every allowed resolution x every
        batch size up to max_batch_size (each shape tunes its own kernels, and compiled/graphed networks
        specialise on shapes); on the CPU one small forward that proves the model runs."""
        if not self._on_cuda:
            return [(CPU_WARMUP_RESOLUTION, 1)]
        resolutions = [parse_resolution(text) for text in (self.spec.allowed_resolutions or
                                                              (self.spec.default_resolution,))]
        if not self.settings.warmup_all_shapes:
            return [(parse_resolution(self.spec.default_resolution), 1)]
        return [(resolution, batch) for resolution in resolutions
                for batch in range(1, self.settings.max_batch_size + 1)]

    def _warm_up(self, eager: nn.Module) -> None:
        for (width, height), batch in self.warmup_shapes():
            dummy = torch.zeros(batch, 3, height, width, device=self._device)
            started = time.perf_counter()
            try:
                self._forward(dummy)
            except Exception:
                if self._network is eager:
                    raise
                log.warning("torch.compile failed at the warm-up forward; running eagerly", exc_info=True)
                self._network = eager
                self._forward(dummy)
            log.info("variant %s warm-up forward %dx%d batch %d took %.2fs", self.spec.id, width, height, batch,
                     time.perf_counter() - started)

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        # CUDA's channels-last bilinear upsampling indexes with 32-bit ints: the decoder's full-resolution
        # feature maps (up to FULL_RES_CHANNELS channels) must stay under 2**31 elements per forward, so a
        # big batch at 2048² runs as several smaller forwards.
        per_image = FULL_RES_CHANNELS * batch.shape[-2] * batch.shape[-1]
        most = max(1, (2**31 - 1) // per_image)
        if batch.shape[0] > most:
            return torch.cat([self._forward(part) for part in batch.split(most)])
        half = self._half_dtype
        if half is not None:
            batch = batch.to(half)
        if self._on_cuda and self.settings.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            logits = self.network(batch)
        if self._on_cuda:
            torch.cuda.synchronize(self._device)  # so the stage timings mean something
        return logits

    def prepare(self, image: ImageLike, resolution: tuple[int, int]) -> PreparedImage:
        """The network input for one image (job thread). CUDA: one pinned, non-blocking upload of the
        uint8 image, resized and normalised on the device, which keeps the upload for `render_outputs`."""
        width, height = check_resolution(resolution)
        rgb = pixels.as_rgb_array(image)
        size = (rgb.shape[1], rgb.shape[0])
        if not self._on_cuda:
            return PreparedImage(network_input=torch.from_numpy(pixels.input_array(rgb, (width, height))), size=size)
        with torch.inference_mode():
            host = torch.from_numpy(np.ascontiguousarray(rgb)).pin_memory()
            device_rgb = host.to(self._device, non_blocking=True).permute(2, 0, 1)
            network_input = device_input(device_rgb, (width, height))
        return PreparedImage(network_input=network_input, size=size, device_rgb=device_rgb,
                             extra={"pinned": host})  # keep the pinned buffer alive until the copy is done

    def forward(self, prepared: Sequence[PreparedImage]) -> list[torch.Tensor]:
        """Logits (1, h, w) per image, for images prepared at one resolution (the batcher's only work);
        at most max_batch_size images per forward."""
        out: list[torch.Tensor] = []
        step = self.settings.max_batch_size
        for start in range(0, len(prepared), step):
            chunk = prepared[start:start + step]
            inputs = [item.network_input.to(self._device, non_blocking=True) for item in chunk]
            batch = inputs[0].unsqueeze(0) if len(inputs) == 1 else torch.stack(inputs)  # no copy for one
            out.extend(self._forward(batch).unbind(0))
        return out

    def mask_for(self, logits: torch.Tensor, prepared: PreparedImage) -> np.ndarray | torch.Tensor:
        """Probabilities at the image's own size (job thread): float32 numpy on the CPU; on CUDA a device
        tensor, for `render_outputs` to compose there."""
        with torch.inference_mode():
            probabilities = logits.float().sigmoid()
            if self._on_cuda:
                return device_mask_at_size(probabilities, prepared.size)
            # OpenCV resize (area when shrinking, bilinear otherwise), off the GIL
            host = probabilities.to("cpu", torch.float32).numpy()
            return pixels.mask_at_size(host.reshape(host.shape[-2:]), prepared.size)

    def predict_masks(self, images: Sequence[ImageLike], resolution: tuple[int, int], *,
                      timings: StageTimings | None = None) -> list[np.ndarray]:
        """Masks (float32 HxW numpy in [0, 1], each at its image's original size) for RGB images.

        Every image is resized to the operating `resolution` = (width, height), so images go
        through the network together, `max_batch_size` at a time; each probability map is then
        resized back to its image's size.
        """
        check_resolution(resolution)
        timings = timings if timings is not None else StageTimings()
        with timings.stage("preprocess"):
            prepared = [self.prepare(image, resolution) for image in images]
        with timings.stage("forward"):
            logits = self.forward(prepared)
        with timings.stage("postprocess"):
            masks = [self.mask_for(item, prep) for item, prep in zip(logits, prepared, strict=True)]
        return [mask.cpu().numpy() if isinstance(mask, torch.Tensor) else mask for mask in masks]

    def render_outputs(self, image: ImageLike, mask: np.ndarray | torch.Tensor, *, output_format: str,
                       output_mask: bool, refine_foreground: bool, mask_only: bool,
                       timings: StageTimings | None = None,
                       prepared: PreparedImage | None = None) -> RenderedOutputs:
        """`render_outputs` with the configured encoder settings (and, on CUDA, the device-side image)."""
        return render_outputs(
            image, mask, output_format=output_format, output_mask=output_mask,
            refine_foreground=refine_foreground, mask_only=mask_only, device=self._device, timings=timings,
            png_compress_level=self.settings.png_compress_level, webp_quality=self.settings.webp_quality,
            device_rgb=prepared.device_rgb if prepared is not None else None,
        )
