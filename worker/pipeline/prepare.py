"""Preparing: a decoded RGB image -> the network's input at the operating resolution (`prepare`).

CPU: OpenCV resize (area when shrinking, bilinear otherwise) and normalisation in the job's thread, off the
GIL. CUDA: one pinned, non-blocking upload of the uint8 image, resized (antialiased bilinear) and
normalised on the device, which keeps the upload for the output stage.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from worker.pipeline.types import ImageLike, PreparedImage, check_resolution

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
_SCALE = (1.0 / (255.0 * IMAGENET_STD)).astype(np.float32)
_OFFSET = (IMAGENET_MEAN / IMAGENET_STD).astype(np.float32)

cv2.setNumThreads(1)  # parallelism comes from job threads; OpenCV's own pool would oversubscribe


def prepare(image: ImageLike, resolution: tuple[int, int], device: torch.device) -> PreparedImage:
    """The network input for one image (one frame), at `resolution` = (width, height)."""
    width, height = check_resolution(resolution)
    rgb = as_rgb_array(image)
    size = (rgb.shape[1], rgb.shape[0])
    if device.type != "cuda":
        return PreparedImage(network_input=torch.from_numpy(input_array(rgb, (width, height))), size=size)
    with torch.inference_mode():
        host = torch.from_numpy(np.ascontiguousarray(rgb)).pin_memory()
        device_rgb = host.to(device, non_blocking=True).permute(2, 0, 1)
        network_input = device_input(device_rgb, (width, height))
    return PreparedImage(
        network_input=network_input, size=size, device_rgb=device_rgb, extra={"pinned": host}
    )  # keep the pinned buffer alive until the copy is done


def as_rgb_array(image: ImageLike) -> np.ndarray:
    """A decoded image as (H, W, 3) uint8, without copying arrays."""
    if isinstance(image, np.ndarray):
        return image
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {image.mode}")
    return np.asarray(image)


def interpolation(source: tuple[int, int], target: tuple[int, int]) -> int:
    """OpenCV's filter for a resize from `source` to `target` (W, H): area when shrinking, else bilinear."""
    shrinking = target[0] < source[0] and target[1] < source[1]
    return cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR


def input_array(rgb: np.ndarray, resolution: tuple[int, int]) -> np.ndarray:
    """CPU: (H, W, 3) uint8 -> (3, h, w) float32 at `resolution` = (w, h), ImageNet-normalised."""
    height, width = rgb.shape[:2]
    if (width, height) != resolution:
        rgb = cv2.resize(rgb, resolution, interpolation=interpolation((width, height), resolution))
    out = np.empty((3, resolution[1], resolution[0]), dtype=np.float32)
    for channel, plane in enumerate(cv2.split(rgb)):  # x / (255 std) - mean / std, one pass per plane
        cv2.addWeighted(
            plane,
            float(_SCALE[channel]),
            plane,
            0.0,
            -float(_OFFSET[channel]),
            dst=out[channel],
            dtype=cv2.CV_32F,
        )
    return out


def device_input(rgb: torch.Tensor, resolution: tuple[int, int]) -> torch.Tensor:
    """Device: (3, H, W) uint8 on any device -> (3, h, w) float32 at `resolution`, normalised, on that device
    (antialiased bilinear when shrinking, as the area filter on the CPU path)."""
    width, height = resolution
    x = rgb.unsqueeze(0).float()
    if tuple(x.shape[-2:]) != (height, width):
        x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.as_tensor(IMAGENET_MEAN * 255.0, device=x.device).view(1, 3, 1, 1)
    std = torch.as_tensor(IMAGENET_STD * 255.0, device=x.device).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std)[0]
