"""The predictor: one variant's network on one device, loaded once and kept warm.

The worker's per-job path (worker.pipeline's stages), split so that only the forward runs on the batcher's
thread:

    rgb = decode_rgb(data, max_pixels=..., max_side=...)              # worker.pipeline.decode
    prepared = predictor.prepare(rgb, (width, height))                # job thread: resize + normalise
    (logits,) = predictor.forward([prepared])                         # batcher thread: the network only
    mask = postprocess(logits, prepared)                              # job thread: sigmoid, resize, 8-bit
    rendered = render(rgb, mask, params, encoding=...)                # worker.pipeline.render

`predict_masks` does the first three for a list of images (tests, benchmarks, the patch-order check) and
returns float probabilities.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import cast

import numpy as np
import torch
from torch import nn

from common.domain.variants import VariantSpec
from common.settings import WorkerSettings
from worker.allocator import retain_freed_memory
from worker.loading import LoadedNetwork, load_network, settle_patch_order
from worker.null_model import NULL_MODEL_BANNER, NullNetwork
from worker.patch_order import PatchOrderReport
from worker.pipeline.postprocess import mask_probabilities
from worker.pipeline.prepare import prepare
from worker.pipeline.types import ImageLike, PreparedImage, check_resolution, parse_resolution
from worker.timings import StageTimings

# The widest decoder feature map at the input's resolution (Swin-T: 96 channels, Swin-L: 192; margin).
FULL_RES_CHANNELS = 256

log = logging.getLogger(__name__)

CPU_WARMUP_RESOLUTION = (64, 64)
UNTRAINED_WARNING = (
    "UNTRAINED WEIGHTS: this result was computed with recipe (random) weights, not a "
    "trained BiRefNet checkpoint; the mask is meaningless."
)
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} was asked for, but CUDA is not available")
    return device


# --- Predictor ---


class Predictor:
    """One variant's network on one device: `load()` once, then `predict_masks` per batch (or `prepare` and
    `forward`, which the worker's jobs and batcher use)."""

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
    def result_warning(self) -> str | None:
        """What every result and job log of this predictor must say: not a trained model's mask."""
        if self.null_model:
            return NULL_MODEL_BANNER
        return UNTRAINED_WARNING if self.untrained else None

    @property
    def log_prefix(self) -> str:
        """Put before every job log line: the null model says so on each."""
        return f"[{NULL_MODEL_BANNER}] " if self.null_model else ""

    @property
    def weights_description(self) -> str:
        description = self._require_loaded().description
        report = self.patch_order_report
        if report is not None and report.in_use != report.configured:
            description += (
                f"; patch order {report.in_use} ADOPTED by the self-check (configured {report.configured})"
            )
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
        # eager, before compile: loading decides the decoder's patch order and sets it
        self.patch_order_report = settle_patch_order(
            module, self.spec, self.settings, untrained=loaded.untrained, masks=self.predict_masks
        )
        if self.settings.compile_model:
            mode = self.settings.compile_mode if self.settings.compile_mode != "default" else None
            # torch.compile of a Module returns an OptimizedModule; its stub says only "callable".
            self._network = cast(nn.Module, torch.compile(module, mode=mode))
        if self.settings.warmup_forward:
            self._warm_up(eager=module)
        log.info(
            "variant %s loaded on %s%s: %s",
            self.spec.id,
            self._device,
            f" ({self.settings.inference_dtype} weights)" if self._half_dtype else "",
            loaded.description,
        )

    def warmup_shapes(self) -> list[tuple[tuple[int, int], int]]:
        """(resolution, batch size) pairs the warm-up runs: on CUDA every allowed resolution x every
        batch size up to max_batch_size (each shape tunes its own kernels, and compiled/graphed networks
        specialise on shapes); on the CPU one small forward that proves the model runs."""
        if not self._on_cuda:
            return [(CPU_WARMUP_RESOLUTION, 1)]
        resolutions = [
            parse_resolution(text)
            for text in (self.spec.allowed_resolutions or (self.spec.default_resolution,))
        ]
        if not self.settings.warmup_all_shapes:
            return [(parse_resolution(self.spec.default_resolution), 1)]
        return [
            (resolution, batch)
            for resolution in resolutions
            for batch in range(1, self.settings.max_batch_size + 1)
        ]

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
            log.info(
                "variant %s warm-up forward %dx%d batch %d took %.2fs",
                self.spec.id,
                width,
                height,
                batch,
                time.perf_counter() - started,
            )

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
        """The network input for one image (job thread): worker.pipeline.prepare on this device."""
        return prepare(image, resolution, self._device)

    def forward(self, prepared: Sequence[PreparedImage]) -> list[torch.Tensor]:
        """Logits (1, h, w) per image, for images prepared at one resolution (the batcher's only work);
        at most max_batch_size images per forward."""
        out: list[torch.Tensor] = []
        step = self.settings.max_batch_size
        for start in range(0, len(prepared), step):
            chunk = prepared[start : start + step]
            inputs = [item.network_input.to(self._device, non_blocking=True) for item in chunk]
            batch = inputs[0].unsqueeze(0) if len(inputs) == 1 else torch.stack(inputs)  # no copy for one
            out.extend(self._forward(batch).unbind(0))
        return out

    def predict_masks(
        self, images: Sequence[ImageLike], resolution: tuple[int, int], *, timings: StageTimings | None = None
    ) -> list[np.ndarray]:
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
            masks = [mask_probabilities(item, prep) for item, prep in zip(logits, prepared, strict=True)]
        return [mask.cpu().numpy() if isinstance(mask, torch.Tensor) else mask for mask in masks]
