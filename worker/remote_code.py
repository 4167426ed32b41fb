"""Opt-in: serve a BiRefNet-family Hugging Face repo with the repo's own modelling code.

`transformers.AutoModelForImageSegmentation.from_pretrained(..., trust_remote_code=True)` imports
and runs Python shipped inside the repo, so it is off unless `trust_remote_code` is set. It is
for architectures the native model does not implement; checkpoints that fit the native model
always load natively.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)


class RemoteCodeNetwork(nn.Module):
    """Makes a remote-code model look like the native one: (N,3,H,W) -> (N,1,H,W) logits.

    BiRefNet's published code returns a list of predictions (coarse to fine); the last is the
    output. Models returning a `ModelOutput` with `.logits`, or a plain tensor, work too.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def config(self):
        return getattr(self.model, "config", None)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        output = self.model(pixel_values)
        if isinstance(output, (list, tuple)):
            output = output[-1]
        elif hasattr(output, "logits"):
            output = output.logits
        if not isinstance(output, torch.Tensor) or output.dim() != 4:
            raise TypeError(f"remote-code model returned {type(output).__name__}, expected (N,1,H,W) logits")
        return output


def has_remote_code(folder: Path) -> bool:
    """True when `folder` is a Hugging Face layout repo that declares custom code (`auto_map`)."""
    config = Path(folder) / "config.json"
    if not config.is_file():
        return False
    try:
        return bool(json.loads(config.read_text()).get("auto_map"))
    except (OSError, ValueError):
        return False


def load_remote_code_network(folder: Path) -> RemoteCodeNetwork:
    """Load a local repo folder (already downloaded and pinned) with its own code, in float32."""
    from transformers import AutoModelForImageSegmentation

    log.warning(
        "loading %s with trust_remote_code=True: running Python code shipped with the checkpoint", folder
    )
    model = AutoModelForImageSegmentation.from_pretrained(
        str(folder), trust_remote_code=True, dtype=torch.float32, local_files_only=True
    )
    return RemoteCodeNetwork(model)
