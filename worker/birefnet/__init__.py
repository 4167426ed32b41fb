"""Native PyTorch BiRefNet (inference) that loads the official checkpoints.

>>> model = BiRefNet(BiRefNetConfig(backbone="swin_v1_l")).eval()
>>> model.load_state_dict(state_dict, strict=True)
>>> logits = model(x)  # (N, 3, H, W) ImageNet-normalised, H, W multiples of 32 -> (N, 1, H, W)
"""

from .config import PRESETS, BiRefNetConfig
from .model import BiRefNet
from .recipe import recipe_state_dict, recipe_value

__all__ = ["PRESETS", "BiRefNet", "BiRefNetConfig", "recipe_state_dict", "recipe_value"]
