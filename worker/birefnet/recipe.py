"""Deterministic "recipe" weights: a full state dict made from each key's name and shape.

The same recipe produced the official reference logits, so a model built from it can be checked
against them; the product also uses it for demos and tests without a real checkpoint.

Every float entry: ``z = default_rng(crc32(key)).standard_normal(shape)`` (float64), transformed
by the key's last dotted part (leaf), computed in float64 and cast to float32 once:

=============================  ==============================
``relative_position_bias_table``  ``0.5 * z``
``running_mean``                  ``0.1 * z``
``running_var``                   ``0.5 + 0.5 * |z|``
``bias``                          ``0.02 * z``
``weight`` (1-D)                  ``1 + 0.1 * z``
``weight`` (>= 2-D)               ``z / sqrt(prod(shape[1:]))``
=============================  ==============================

Integer buffers (``relative_position_index``, ``num_batches_tracked``) are taken from the model.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

COMPUTED_LEAVES = ("relative_position_index", "num_batches_tracked")


def recipe_value(key: str, shape: Sequence[int]) -> np.ndarray:
    """float32 array for one float state_dict entry."""
    leaf = key.rsplit(".", 1)[-1]
    shape = tuple(int(s) for s in shape)
    z = np.random.default_rng(zlib.crc32(key.encode("utf-8"))).standard_normal(shape)
    if leaf == "relative_position_bias_table":
        v = 0.5 * z
    elif leaf == "running_mean":
        v = 0.1 * z
    elif leaf == "running_var":
        v = 0.5 + 0.5 * np.abs(z)
    elif leaf == "bias":
        v = 0.02 * z
    elif leaf == "weight" and len(shape) == 1:
        v = 1.0 + 0.1 * z
    elif leaf == "weight":
        v = z * (1.0 / math.sqrt(math.prod(shape[1:])))
    else:
        raise KeyError(f"no recipe rule for {key} {shape}")
    return v.astype(np.float32)


def recipe_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full state dict for `model` from its own keys and shapes (computed buffers copied as built)."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        if key.rsplit(".", 1)[-1] in COMPUTED_LEAVES:
            out[key] = tensor.detach().clone()
        else:
            out[key] = torch.from_numpy(recipe_value(key, tensor.shape))
    return out
