"""Hugging Face layout repos: native loading by folder / repo id, and the opt-in remote-code path.

The remote-code repo is written by the test into a temp folder: a config class, a small
`PreTrainedModel` whose forward returns a list of predictions (as BiRefNet's published code
does), weights saved with `save_pretrained`, and `auto_map` in config.json. No network.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import textwrap
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from skimage import data

from common.domain.schemas import JobParams
from common.domain.variants import VariantSpec
from common.settings import Settings
from worker.birefnet import recipe_state_dict
from worker.engine import Predictor
from worker.loading import build_native
from worker.pipeline.postprocess import to_mask
from worker.pipeline.render import render
from worker.pipeline.types import EncodeOptions
from worker.remote_code import RemoteCodeNetwork
from worker.weights import WeightsError

REVISION = "89abcdef0123456789abcdef0123456789abcdef"
RESOLUTION = (64, 64)

CONFIG_CODE = textwrap.dedent("""
    from transformers import PretrainedConfig


    class TinySegConfig(PretrainedConfig):
        model_type = "tiny_seg"

        def __init__(self, hidden=4, **kwargs):
            self.hidden = hidden
            super().__init__(**kwargs)
""")

MODEL_CODE = textwrap.dedent('''
    import torch
    from torch import nn
    from transformers import PreTrainedModel

    from .configuration_tiny_seg import TinySegConfig


    class TinySeg(PreTrainedModel):
        """Returns [coarse, fine] logits like BiRefNet's remote code; fine = coarse + 1."""

        config_class = TinySegConfig

        def __init__(self, config):
            super().__init__(config)
            self.encode = nn.Conv2d(3, config.hidden, 3, padding=1)
            self.head = nn.Conv2d(config.hidden, 1, 1)
            self.post_init()

        def _init_weights(self, module):
            pass

        def forward(self, pixel_values):
            coarse = self.head(torch.relu(self.encode(pixel_values)))
            return [coarse, coarse + 1.0]
''')


@pytest.fixture(scope="module")
def remote_code_repo(tmp_path_factory) -> Path:
    """A tiny custom-code repo in Hugging Face layout, made with save_pretrained."""
    source = tmp_path_factory.mktemp("tiny_seg_src")
    package = source / "tiny_seg_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "configuration_tiny_seg.py").write_text(CONFIG_CODE)
    (package / "modeling_tiny_seg.py").write_text(MODEL_CODE)
    sys.path.insert(0, str(source))
    try:
        config_module = importlib.import_module("tiny_seg_pkg.configuration_tiny_seg")
        model_module = importlib.import_module("tiny_seg_pkg.modeling_tiny_seg")
        config_module.TinySegConfig.register_for_auto_class()
        model_module.TinySeg.register_for_auto_class("AutoModelForImageSegmentation")
        torch.manual_seed(0)
        model = model_module.TinySeg(config_module.TinySegConfig(hidden=4))
        repo = tmp_path_factory.mktemp("tiny_seg_repo")
        model.save_pretrained(repo)
    finally:
        sys.path.remove(str(source))
        for name in [n for n in sys.modules if n.startswith("tiny_seg_pkg")]:
            del sys.modules[name]
    config = json.loads((repo / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageSegmentation"].endswith("TinySeg")
    assert (repo / "modeling_tiny_seg.py").is_file() and (repo / "model.safetensors").is_file()
    return repo


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return Image.fromarray(data.chelsea())


def spec_for(weights: str) -> VariantSpec:
    return VariantSpec(id="hf-test", weights=weights, backbone="swin_v1_nano")


def settings_for(tmp_path: Path, **fields) -> Settings:
    return Settings(device="cpu", weights_cache_dir=str(tmp_path / "cache"), warmup_forward=False, **fields)


def test_remote_code_is_off_by_default(remote_code_repo, tmp_path):
    predictor = Predictor(spec_for(str(remote_code_repo)), settings_for(tmp_path))
    with pytest.raises(WeightsError, match="BIREFNET_TRUST_REMOTE_CODE") as error:
        predictor.load()
    assert "missing keys" in str(error.value)  # the native attempt's reasons come first


def test_remote_code_repo_serves_like_the_native_predictor(remote_code_repo, tmp_path, photo):
    predictor = Predictor(spec_for(str(remote_code_repo)), settings_for(tmp_path, trust_remote_code=True))
    predictor.load()
    assert isinstance(predictor.network, RemoteCodeNetwork)
    assert predictor.untrained is False and "transformers remote code" in predictor.weights_description

    (mask,) = predictor.predict_masks([photo], RESOLUTION)
    assert mask.shape == (photo.height, photo.width) and mask.dtype == np.float32
    assert mask.min() >= 0.0 and mask.max() <= 1.0

    # The wrapper takes the last element of the returned list (coarse + 1), not the first.
    x = torch.zeros(1, 3, 32, 32)
    with torch.inference_mode():
        coarse, fine = predictor.network.model(x)
        torch.testing.assert_close(predictor.network(x), fine)
        assert not torch.allclose(fine, coarse)

    rendered = render(
        photo,
        to_mask(mask),
        JobParams(output_format="png", output_mask=True, refine_foreground=False),
        encoding=EncodeOptions(),
    )
    assert (rendered.image.width, rendered.image.height) == photo.size


def native_hf_folder(root: Path, with_auto_map: bool) -> Path:
    """A Hugging Face layout folder whose weights fit the native nano model."""
    root.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["BiRefNet"]}
    if with_auto_map:
        config["auto_map"] = {"AutoModelForImageSegmentation": "birefnet.BiRefNet"}
    (root / "config.json").write_text(json.dumps(config))
    save_file(recipe_state_dict(build_native(spec_for("recipe"))), root / "model.safetensors")
    return root


def test_hf_folder_that_fits_loads_natively_even_with_remote_code_allowed(tmp_path, photo):
    # auto_map points at code that does not exist: proof that it is never imported.
    folder = native_hf_folder(tmp_path / "repo", with_auto_map=True)
    predictor = Predictor(spec_for(str(folder)), settings_for(tmp_path, trust_remote_code=True))
    predictor.load()
    assert not isinstance(predictor.network, RemoteCodeNetwork)
    assert predictor.untrained is False
    (mask,) = predictor.predict_masks([photo], RESOLUTION)
    assert mask.shape == (photo.height, photo.width)


def test_hf_repo_id_loads_natively_from_the_pinned_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    settings = settings_for(tmp_path)
    snapshot = (
        Path(settings.weights_cache_dir) / "hf" / "models--owner--tiny-birefnet" / "snapshots" / REVISION
    )
    native_hf_folder(snapshot, with_auto_map=False)
    predictor = Predictor(spec_for(f"hf://owner/tiny-birefnet@{REVISION}"), settings)
    predictor.load()
    assert not isinstance(predictor.network, RemoteCodeNetwork)
    assert predictor.weights_description.startswith(f"hf://owner/tiny-birefnet@{REVISION}")
