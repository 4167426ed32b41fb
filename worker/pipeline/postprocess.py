"""Post-processing: a forward's logits -> the image's `Mask` (`postprocess`): sigmoid, resize back to the
image's size, and the one place where a mask becomes 8-bit (`to_alpha8`).

CPU: the probabilities come to the host at the operating resolution and OpenCV resizes them (area when
shrinking, bilinear otherwise), off the GIL. CUDA: sigmoid, antialiased resize and quantisation run on the
device; one 8-bit copy comes back (kept and cached), and the device copy stays for the output stage.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from worker.pipeline.prepare import interpolation
from worker.pipeline.types import Mask, PreparedImage


def postprocess(logits: torch.Tensor, prepared: PreparedImage) -> Mask:
    """One image's (1, h, w) logits -> its 8-bit mask at its own size."""
    return to_mask(mask_probabilities(logits, prepared), prepared.device_rgb)


def to_mask(probabilities: np.ndarray | torch.Tensor, device_rgb: torch.Tensor | None = None) -> Mask:
    """Probabilities at the image's size -> its Mask; a tensor's stays where it is, beside `device_rgb`."""
    if isinstance(probabilities, np.ndarray):
        return Mask(to_alpha8(probabilities))
    with torch.inference_mode():
        alpha8 = to_alpha8(probabilities)
        return Mask(alpha8.cpu().numpy(), device_levels=alpha8.float().div_(255.0), device_rgb=device_rgb)


def mask_probabilities(logits: torch.Tensor, prepared: PreparedImage) -> np.ndarray | torch.Tensor:
    """Probabilities at the image's own size, not quantised (the patch-order check scores these): float32
    numpy from CPU logits, a float32 tensor on the logits' device from CUDA ones."""
    with torch.inference_mode():
        probabilities = logits.float().sigmoid()
        if probabilities.device.type == "cuda":
            return device_mask_at_size(probabilities, prepared.size)
        host = probabilities.to("cpu", torch.float32).numpy()
        return mask_at_size(host.reshape(host.shape[-2:]), prepared.size)


def to_alpha8(mask):
    """Float mask in [0, 1] -> uint8 levels, rounded to nearest (half to even), for numpy arrays and tensors
    alike: the only conversion of a mask to 8 bits."""
    if isinstance(mask, torch.Tensor):
        return mask.float().mul(255.0).round_().clamp_(0, 255).to(torch.uint8)
    levels = np.rint(np.asarray(mask, dtype=np.float32) * np.float32(255.0))
    return np.clip(levels, 0, 255, out=levels).astype(np.uint8)


def mask_at_size(probabilities: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """CPU: (h, w) float32 probabilities -> float32 (H, W) mask in [0, 1] at `size` = (W, H)."""
    height, width = probabilities.shape
    if (width, height) != size:
        probabilities = cv2.resize(probabilities, size, interpolation=interpolation((width, height), size))
    return np.clip(probabilities, 0.0, 1.0, out=probabilities if probabilities.flags.writeable else None)


def device_mask_at_size(probabilities: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Device: (1, h, w) probabilities -> float32 (H, W) mask at `size`, on the probabilities' device."""
    width, height = size
    x = probabilities.float().reshape(1, 1, *probabilities.shape[-2:])
    if tuple(x.shape[-2:]) != (height, width):
        x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return x[0, 0].clamp_(0.0, 1.0)
