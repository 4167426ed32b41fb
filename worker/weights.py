"""Checkpoint sources -> state dicts for the native BiRefNet, with strict, readable key checks.

A source string (`VariantSpec.weights`) is one of:

* `hf://<owner>/<repo>@<revision>/<file>`: one file of a Hugging Face repo, pinned to a revision
  (commit hash, tag or branch), via `huggingface_hub.hf_hub_download` (cached under
  `<weights_cache_dir>/hf`; `HF_HUB_OFFLINE=1` serves from that cache only).
* `hf://<owner>/<repo>@<revision>` (no file) or a bare `<owner>/<repo>`: the whole repo in Hugging
  Face layout (config.json + model.safetensors / pytorch_model.bin, possibly sharded).
* `https://...`: downloaded once into `<weights_cache_dir>/url/` (temp file + atomic rename).
* `s3://bucket/key`: via boto3 (`s3_endpoint_url`), cached under `<weights_cache_dir>/s3/` and
  re-fetched only when the object's ETag changes.
* a local `.safetensors` / `.pth` / `.pt` / `.bin` / `.ckpt` file, or a folder in HF layout.
* `recipe`: untrained weights made from the reference recipe. Never a trained model: only used
  when asked for explicitly, or as `weights_fallback="recipe"` when the real source fails.

Any source except `recipe` may end in `#sha256=<hex>` to verify the file before it is used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlparse

import huggingface_hub.constants
import torch
from torch import nn

from common.settings import WorkerSettings
from worker.birefnet.recipe import COMPUTED_LEAVES  # computed buffers: a checkpoint may lack them

log = logging.getLogger(__name__)

RECIPE = "recipe"
CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
# Written by DataParallel / DistributedDataParallel ("module.") and torch.compile ("_orig_mod.").
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Weight files looked for in a folder (Hugging Face layout), in order of preference.
FOLDER_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SHOWN_KEYS = 8


class WeightsError(RuntimeError):
    """A checkpoint cannot be fetched, read, or does not fit the model."""


@dataclass(frozen=True)
class WeightSource:
    """A parsed source string."""

    kind: str  # "hf", "hf-repo", "https", "s3", "local", "recipe"
    location: str  # repo id, URL, "bucket/key" or path
    revision: str | None = None
    filename: str | None = None
    sha256: str | None = None

    @property
    def description(self) -> str:
        if self.kind == "hf":
            return f"hf://{self.location}@{self.revision}/{self.filename}"
        if self.kind == "hf-repo":
            return f"hf://{self.location}@{self.revision}"
        if self.kind == "s3":
            return f"s3://{self.location}"
        return self.location


def parse_source(source: str) -> WeightSource:
    """Parse a `VariantSpec.weights` string (see the module docstring)."""
    text = source.strip()
    sha256 = None
    if "#sha256=" in text:
        text, sha256 = text.split("#sha256=", 1)
        sha256 = sha256.lower()
    if text == RECIPE:
        return WeightSource("recipe", RECIPE)
    if text.startswith("hf://"):
        body = text[len("hf://") :]
        repo, _, rest = body.partition("@")
        if not rest:  # no revision given: "main", but say so, since it moves
            parts = body.split("/", 2)
            repo, rest = "/".join(parts[:2]), "main" + ("/" + parts[2] if len(parts) > 2 else "")
            log.warning("weights %s has no @revision; using the moving branch 'main'", source)
        revision, _, filename = rest.partition("/")
        if not _REPO_ID.match(repo) or not revision:
            raise WeightsError(
                f"bad Hugging Face source {source!r}; expected hf://<owner>/<repo>@<revision>[/<file>]"
            )
        if filename:
            return WeightSource("hf", repo, revision, filename, sha256)
        return WeightSource("hf-repo", repo, revision, None, sha256)
    if text.startswith("https://") or text.startswith("http://"):
        return WeightSource("https", text, sha256=sha256)
    if text.startswith("s3://"):
        parsed = urlparse(text)
        if not parsed.netloc or not parsed.path.strip("/"):
            raise WeightsError(f"bad S3 source {source!r}; expected s3://bucket/key")
        return WeightSource("s3", f"{parsed.netloc}/{parsed.path.lstrip('/')}", sha256=sha256)
    path = Path(text).expanduser()
    if not path.exists() and _REPO_ID.match(text) and not text.endswith(CHECKPOINT_SUFFIXES):
        log.warning(
            "weights %s is a bare repo id; using the moving branch 'main' (pin it: hf://%s@<commit>)",
            text,
            text,
        )
        return WeightSource("hf-repo", text, "main", None, sha256)
    return WeightSource("local", str(path), sha256=sha256)


# --- Fetching: source -> local file or folder ---


def cache_root(settings: WorkerSettings) -> Path:
    root = Path(settings.weights_cache_dir).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def fetch(source: WeightSource, settings: WorkerSettings) -> Path:
    """Make the checkpoint available locally (download if needed); return the file or folder."""
    if source.kind == "recipe":
        raise WeightsError("'recipe' has no file to fetch")
    if source.kind == "local":
        path = Path(source.location)
        if not path.exists():
            raise WeightsError(f"checkpoint {path} does not exist")
        fetched = path
    elif source.kind in ("hf", "hf-repo"):
        fetched = _fetch_hf(source, settings)
    elif source.kind == "https":
        fetched = _fetch_url(source.location, settings)
    elif source.kind == "s3":
        fetched = _fetch_s3(source.location, settings)
    else:  # pragma: no cover - parse_source only makes the kinds above
        raise WeightsError(f"unknown source kind {source.kind!r}")
    if source.sha256:
        verify_sha256(fetched, source.sha256)
    return fetched


def _fetch_hf(source: WeightSource, settings: WorkerSettings) -> Path:
    """One file (kind "hf") or the whole repo in Hugging Face layout (kind "hf-repo")."""
    from huggingface_hub import hf_hub_download, snapshot_download

    cache_dir = cache_root(settings) / "hf"
    patterns = ["*.json", "*.safetensors", "*.py", "pytorch_model*.bin"]
    try:
        if source.kind == "hf-repo":
            return Path(
                snapshot_download(
                    source.location, revision=source.revision, allow_patterns=patterns, cache_dir=cache_dir
                )
            )
        if source.filename is None:  # reported like any other failed download
            raise ValueError("a Hugging Face file source needs a filename")
        return Path(
            hf_hub_download(source.location, source.filename, revision=source.revision, cache_dir=cache_dir)
        )
    except Exception as exc:  # offline misses, 404s, auth, network: all end the same way
        raise WeightsError(f"cannot download {source.description}: {exc}") from exc


def _fetch_url(url: str, settings: WorkerSettings) -> Path:
    import httpx

    name = Path(urlparse(url).path).name or "checkpoint"
    target = cache_root(settings) / "url" / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{name}"
    if target.exists():
        return target
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise WeightsError(f"{url} is not in the cache ({target}) and HF_HUB_OFFLINE forbids downloading")
    log.info("downloading %s -> %s", url, target)
    try:
        with (
            _atomic_file(target) as handle,
            httpx.stream(
                "GET", url, follow_redirects=True, timeout=httpx.Timeout(settings.http_timeout, connect=10.0)
            ) as response,
        ):
            response.raise_for_status()
            for chunk in response.iter_bytes(1 << 20):
                handle.write(chunk)
    except httpx.HTTPError as exc:
        raise WeightsError(f"cannot download {url}: {exc}") from exc
    return target


def _fetch_s3(location: str, settings: WorkerSettings) -> Path:
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = location.split("/", 1)
    target = cache_root(settings) / "s3" / bucket / key
    etag_file = target.with_name(target.name + ".etag")
    client = boto3.client("s3", endpoint_url=settings.s3_endpoint_url, region_name=settings.aws_region)
    try:
        etag = client.head_object(Bucket=bucket, Key=key)["ETag"]
    except (BotoCoreError, ClientError) as exc:
        gone = isinstance(exc, ClientError) and exc.response.get("Error", {}).get("Code") in (
            "404",
            "NoSuchKey",
        )
        if target.exists() and not gone:  # S3 unreachable: serve the copy fetched earlier
            log.warning("cannot reach s3://%s (%s); using the cached copy %s", location, exc, target)
            return target
        raise WeightsError(f"cannot read s3://{location}: {exc}") from exc
    if target.exists() and etag_file.exists() and etag_file.read_text() == etag:
        return target
    log.info("downloading s3://%s -> %s", location, target)
    try:
        with _atomic_file(target) as handle:
            client.download_fileobj(bucket, key, handle)
    except (BotoCoreError, ClientError) as exc:
        raise WeightsError(f"cannot download s3://{location}: {exc}") from exc
    etag_file.write_text(etag)
    return target


@contextmanager
def _atomic_file(target: Path) -> Iterator[BinaryIO]:
    """Write to a temp file beside `target`, rename over it only when complete (no half files
    in the cache if the process dies, and concurrent workers never read a partial download)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    os.replace(tmp, target)


def verify_sha256(path: Path, expected: str) -> None:
    if path.is_dir():
        raise WeightsError(f"#sha256 needs a single file, {path} is a folder")
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != expected:
        raise WeightsError(f"{path}: sha256 {digest.hexdigest()} does not match the expected {expected}")


# --- Reading: file or folder -> state dict ---


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint file, or the weights of a Hugging Face layout folder, on the CPU."""
    path = Path(path)
    if path.is_dir():
        path = folder_weights_file(path)
    name = path.name
    if name.endswith(".index.json"):
        state = _read_sharded(path)
    elif name.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    elif name.endswith(CHECKPOINT_SUFFIXES):
        state = _read_pickle(path)
    else:
        raise WeightsError(
            f"{path}: unknown checkpoint type (expected one of {', '.join(CHECKPOINT_SUFFIXES)})"
        )
    return strip_wrapper_prefixes(state)


def folder_weights_file(folder: Path) -> Path:
    for name in FOLDER_WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise WeightsError(f"{folder} has none of {', '.join(FOLDER_WEIGHT_FILES)}")


def _read_sharded(index_path: Path) -> dict[str, torch.Tensor]:
    weight_map = json.loads(index_path.read_text())["weight_map"]
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        state.update(read_state_dict(index_path.parent / shard))
    return state


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        # weights_only: a checkpoint is data; never run pickled code from it.
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises a variety of pickle / zip errors
        raise WeightsError(f"cannot read {path}: {exc}") from exc
    # Training scripts often wrap the weights: {"state_dict": ...}, {"model": ...}, {"model_state_dict": ...}.
    for wrapper_key in ("state_dict", "model_state_dict", "model", "net"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper_key), dict):
            obj = obj[wrapper_key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors")
    return obj


def strip_wrapper_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop leading `module.` / `_orig_mod.` (in any combination) from every key."""
    cleaned: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        stripped = key
        while stripped.startswith(WRAPPER_PREFIXES):
            for prefix in WRAPPER_PREFIXES:
                stripped = stripped.removeprefix(prefix)
        cleaned[stripped] = value
    return cleaned


# --- Fitting: state dict -> model, strictly ---


def load_into(model: nn.Module, state: dict[str, torch.Tensor], *, source: str = "checkpoint") -> None:
    """`model.load_state_dict(state, strict=True)`, with a readable error on mismatch.

    Computed integer buffers (`relative_position_index`, `num_batches_tracked`) missing from the
    checkpoint are taken from the model; every learned tensor must be present with its shape.
    """
    expected = model.state_dict()
    completed = dict(state)
    for key in expected.keys() - state.keys():
        if key.rsplit(".", 1)[-1] in COMPUTED_LEAVES:
            completed[key] = expected[key]
    problem = describe_mismatch(expected, completed)
    if problem:
        hint = backbone_hint(state, getattr(getattr(model, "config", None), "backbone", None))
        raise WeightsError(
            f"weights from {source} do not fit {_model_name(model)}: {problem}"
            + (f". {hint}" if hint else "")
        )
    model.load_state_dict(completed, strict=True)


def describe_mismatch(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> str:
    """'' when keys and shapes agree, else counts and the first few missing / unexpected / misshapen keys."""
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    misshapen = sorted(
        f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}"
        for k in expected.keys() & state.keys()
        if state[k].shape != expected[k].shape
    )
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", misshapen)):
        if keys:
            parts.append(f"{len(keys)} {label} key{'s' if len(keys) != 1 else ''} ({_first(keys)})")
    return "; ".join(parts)


def _first(keys: Iterable[str]) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:_SHOWN_KEYS])
    return shown + (f", ... {len(keys) - _SHOWN_KEYS} more" if len(keys) > _SHOWN_KEYS else "")


def _model_name(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    backbone = getattr(config, "backbone", None)
    return f"{type(model).__name__}({backbone})" if backbone else type(model).__name__


def guess_backbone(state: dict[str, torch.Tensor]) -> str | None:
    """Which Swin preset a BiRefNet checkpoint was trained with, from its shapes (None if unsure)."""
    embed = state.get("bb.patch_embed.proj.weight")
    if embed is None or embed.dim() != 4:
        return None
    stage3_depth = len({k.split(".")[4] for k in state if k.startswith("bb.layers.2.blocks.")})
    return {
        (96, 6): "swin_v1_t",
        (96, 18): "swin_v1_s",
        (128, 18): "swin_v1_b",
        (192, 18): "swin_v1_l",
        (32, 1): "swin_v1_nano",
    }.get((embed.shape[0], stage3_depth))


def backbone_hint(state: dict[str, torch.Tensor], model_backbone: str | None = None) -> str:
    """A likely cause of a mismatch, read from the checkpoint's own keys and shapes ('' if none)."""
    if not any(k.startswith("bb.") for k in state):
        return (
            "The checkpoint has no 'bb.' (backbone) keys, so it is probably not a BiRefNet checkpoint "
            "in the official layout."
        )
    guess = guess_backbone(state)
    if guess and guess != model_backbone:
        return (
            f"The checkpoint looks like backbone {guess}, the model is {model_backbone}: "
            "check the variant's `backbone`."
        )
    return ""
