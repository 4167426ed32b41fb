"""worker.weights: sources, file formats, prefixes, strict key checks, S3 / URL / Hub caches."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import boto3
import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import save_file

from common.settings import Settings
from worker.birefnet import BiRefNet, BiRefNetConfig, recipe_state_dict
from worker.weights import (
    WeightsError,
    fetch,
    guess_backbone,
    load_into,
    parse_source,
    read_state_dict,
)

REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def nano() -> BiRefNet:
    return BiRefNet(BiRefNetConfig(backbone="swin_v1_nano")).eval()


@pytest.fixture(scope="module")
def nano_state(nano) -> dict[str, torch.Tensor]:
    return recipe_state_dict(nano)


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(weights_cache_dir=str(tmp_path / "cache"))


def small_state() -> dict[str, torch.Tensor]:
    return {"layer.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3), "layer.bias": torch.ones(2)}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# --------------------------------------------------------------------------------------------
# Source strings
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kind", "location", "revision", "filename"),
    [
        (
            f"hf://ZhengPeng7/BiRefNet@{REVISION}/model.safetensors",
            "hf",
            "ZhengPeng7/BiRefNet",
            REVISION,
            "model.safetensors",
        ),
        (
            "hf://ZhengPeng7/BiRefNet_lite@main/sub/dir/model.safetensors",
            "hf",
            "ZhengPeng7/BiRefNet_lite",
            "main",
            "sub/dir/model.safetensors",
        ),
        (f"hf://ZhengPeng7/BiRefNet@{REVISION}", "hf-repo", "ZhengPeng7/BiRefNet", REVISION, None),
        (
            "hf://ZhengPeng7/BiRefNet/model.safetensors",
            "hf",
            "ZhengPeng7/BiRefNet",
            "main",
            "model.safetensors",
        ),
        ("ZhengPeng7/BiRefNet", "hf-repo", "ZhengPeng7/BiRefNet", "main", None),
        (
            "https://example.com/w/BiRefNet-DIS_ep580.pth",
            "https",
            "https://example.com/w/BiRefNet-DIS_ep580.pth",
            None,
            None,
        ),
        ("s3://models/birefnet/general.safetensors", "s3", "models/birefnet/general.safetensors", None, None),
        ("recipe", "recipe", "recipe", None, None),
    ],
)
def test_parse_source(text, kind, location, revision, filename):
    source = parse_source(text)
    assert (source.kind, source.location, source.revision, source.filename) == (
        kind,
        location,
        revision,
        filename,
    )


def test_parse_source_local_path_and_checksum(tmp_path):
    path = tmp_path / "w.safetensors"
    source = parse_source(f"{path}#sha256=ABC123")
    assert (source.kind, source.location, source.sha256) == ("local", str(path), "abc123")


@pytest.mark.parametrize("bad", ["hf://not-a-repo@main/x", "s3://bucket-only", "s3:///key"])
def test_parse_source_rejects_malformed(bad):
    with pytest.raises(WeightsError):
        parse_source(bad)


# --------------------------------------------------------------------------------------------
# Reading files and folders
# --------------------------------------------------------------------------------------------


def test_reads_safetensors(tmp_path):
    save_file(small_state(), tmp_path / "w.safetensors")
    assert_same(read_state_dict(tmp_path / "w.safetensors"), small_state())


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "_orig_mod.module."])
@pytest.mark.parametrize("wrapper", [None, "state_dict", "model"])
def test_reads_pth_stripping_prefixes_and_wrappers(tmp_path, prefix, wrapper):
    state = {prefix + key: value for key, value in small_state().items()}
    torch.save({wrapper: state, "epoch": 3} if wrapper else state, tmp_path / "w.pth")
    assert_same(read_state_dict(tmp_path / "w.pth"), small_state())


def test_pickled_code_is_refused(tmp_path):
    torch.save({"layer.weight": torch.ones(1), "evil": object()}, tmp_path / "w.pth")
    with pytest.raises(WeightsError, match="cannot read"):
        read_state_dict(tmp_path / "w.pth")


def test_reads_hf_layout_folders(tmp_path):
    safetensors_repo = tmp_path / "st"
    safetensors_repo.mkdir()
    (safetensors_repo / "config.json").write_text("{}")
    save_file(small_state(), safetensors_repo / "model.safetensors")
    assert_same(read_state_dict(safetensors_repo), small_state())

    bin_repo = tmp_path / "bin"
    bin_repo.mkdir()
    torch.save(small_state(), bin_repo / "pytorch_model.bin")
    assert_same(read_state_dict(bin_repo), small_state())

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    state = small_state()
    save_file({"layer.weight": state["layer.weight"]}, sharded / "model-00001-of-00002.safetensors")
    save_file({"layer.bias": state["layer.bias"]}, sharded / "model-00002-of-00002.safetensors")
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps(
            {
                "weight_map": {
                    "layer.weight": "model-00001-of-00002.safetensors",
                    "layer.bias": "model-00002-of-00002.safetensors",
                }
            }
        )
    )
    assert_same(read_state_dict(sharded), state)

    with pytest.raises(WeightsError, match="model.safetensors"):
        read_state_dict(tmp_path)  # no weights directly in it


def test_unknown_file_type_is_refused(tmp_path):
    (tmp_path / "w.onnx").write_bytes(b"\0")
    with pytest.raises(WeightsError, match="unknown checkpoint type"):
        read_state_dict(tmp_path / "w.onnx")


# --------------------------------------------------------------------------------------------
# Strict fitting
# --------------------------------------------------------------------------------------------


def test_full_checkpoint_loads_strictly(nano, nano_state, tmp_path):
    torch.save({"module." + k: v for k, v in nano_state.items()}, tmp_path / "nano.pth")
    model = BiRefNet(BiRefNetConfig(backbone="swin_v1_nano"))
    load_into(model, read_state_dict(tmp_path / "nano.pth"))
    assert_same(model.state_dict(), nano.state_dict() | nano_state)


def test_computed_buffers_may_be_missing(nano_state):
    model = BiRefNet(BiRefNetConfig(backbone="swin_v1_nano"))
    trimmed = {
        k: v
        for k, v in nano_state.items()
        if not k.endswith(("relative_position_index", "num_batches_tracked"))
    }
    assert len(trimmed) < len(nano_state)
    load_into(model, trimmed)


def test_mismatch_names_missing_unexpected_and_misshapen_keys(nano, nano_state):
    state = dict(nano_state)
    learned = [k for k in state if k.endswith(".weight") and not k.startswith("bb.patch_embed")]
    for key in learned[:12]:
        del state[key]
    state["head.extra.weight"] = torch.zeros(3)
    state["head.other.bias"] = torch.zeros(3)
    reshaped = learned[20]
    state[reshaped] = torch.zeros(7)
    with pytest.raises(WeightsError) as error:
        load_into(nano, state, source="test.pth")
    message = str(error.value)
    assert "weights from test.pth do not fit BiRefNet(swin_v1_nano)" in message
    assert "12 missing keys" in message and sorted(learned[:12])[0] in message and "4 more" in message
    assert "2 unexpected keys (head.extra.weight, head.other.bias)" in message
    assert f"1 shape mismatch key ({reshaped} (7,) != " in message
    assert "looks like backbone" not in message  # the backbone itself is right


def test_wrong_backbone_is_named(nano_state):
    swin_t = BiRefNet(BiRefNetConfig(backbone="swin_v1_t"))
    with pytest.raises(WeightsError, match="looks like backbone swin_v1_nano, the model is swin_v1_t"):
        load_into(swin_t, nano_state)


def test_guess_backbone_from_shapes():
    def fake(embed_dim: int, stage3_depth: int) -> dict[str, torch.Tensor]:
        state = {"bb.patch_embed.proj.weight": torch.empty(embed_dim, 3, 4, 4)}
        state.update({f"bb.layers.2.blocks.{i}.norm1.weight": torch.empty(1) for i in range(stage3_depth)})
        return state

    assert guess_backbone(fake(96, 6)) == "swin_v1_t"
    assert guess_backbone(fake(192, 18)) == "swin_v1_l"
    assert guess_backbone(fake(128, 18)) == "swin_v1_b"
    assert guess_backbone(small_state()) is None


def test_non_birefnet_checkpoint_gets_a_hint(nano):
    with pytest.raises(WeightsError, match="no 'bb.' \\(backbone\\) keys"):
        load_into(nano, small_state())


# --------------------------------------------------------------------------------------------
# Fetching: local, S3, URL, Hugging Face cache
# --------------------------------------------------------------------------------------------


def test_local_missing_file(settings, tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        fetch(parse_source(str(tmp_path / "nope.safetensors")), settings)


def test_sha256_is_verified(settings, tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(small_state(), path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert fetch(parse_source(f"{path}#sha256={digest}"), settings) == path
    with pytest.raises(WeightsError, match="does not match"):
        fetch(parse_source(f"{path}#sha256={'0' * 64}"), settings)


def test_s3_download_is_cached_until_the_object_changes(moto_endpoint, tmp_path, monkeypatch):
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    settings = Settings(weights_cache_dir=str(tmp_path / "cache"), s3_endpoint_url=moto_endpoint)
    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    bucket = f"weights-{tmp_path.name.lower().replace('_', '-')}"[:60]
    s3.create_bucket(Bucket=bucket)
    local = tmp_path / "w.safetensors"
    save_file(small_state(), local)
    s3.upload_file(str(local), bucket, "birefnet/w.safetensors")

    source = parse_source(f"s3://{bucket}/birefnet/w.safetensors")
    cached = fetch(source, settings)
    assert cached.is_relative_to(tmp_path / "cache")
    assert_same(read_state_dict(cached), small_state())
    mtime = cached.stat().st_mtime_ns
    assert fetch(source, settings).stat().st_mtime_ns == mtime  # same ETag: no new download

    changed = {k: v * 2 for k, v in small_state().items()}
    save_file(changed, local)
    s3.upload_file(str(local), bucket, "birefnet/w.safetensors")
    assert_same(read_state_dict(fetch(source, settings)), changed)

    with pytest.raises(WeightsError, match="cannot read s3://"):
        fetch(parse_source(f"s3://{bucket}/missing.safetensors"), settings)


@pytest.fixture
def file_server(tmp_path):
    """Serves tmp_path/served over HTTP on 127.0.0.1 and counts the requests."""
    served = tmp_path / "served"
    served.mkdir()
    hits: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's naming
            hits.append(self.path)
            path = served / self.path.lstrip("/")
            if not path.is_file():
                self.send_error(404)
                return
            body = path.read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", served, hits
    server.shutdown()
    server.server_close()


def test_url_is_downloaded_once_into_the_cache(file_server, settings):
    base, served, hits = file_server
    torch.save({"module." + k: v for k, v in small_state().items()}, served / "BiRefNet-test.pth")
    source = parse_source(f"{base}/BiRefNet-test.pth")
    first = fetch(source, settings)
    assert first.name.endswith("-BiRefNet-test.pth")
    assert_same(read_state_dict(first), small_state())
    assert fetch(source, settings) == first
    assert hits == ["/BiRefNet-test.pth"]
    assert not list(first.parent.glob("*.part"))  # the temp file was renamed, not left behind

    with pytest.raises(WeightsError, match="404"):
        fetch(parse_source(f"{base}/missing.pth"), settings)
    assert not list(first.parent.glob("*missing*"))


def populate_hub_cache(settings: Settings, repo: str, files: dict[str, bytes]) -> Path:
    """Lay files out as huggingface_hub's cache does for a pinned commit."""
    snapshot = (
        Path(settings.weights_cache_dir)
        / "hf"
        / f"models--{repo.replace('/', '--')}"
        / "snapshots"
        / REVISION
    )
    snapshot.mkdir(parents=True)
    for name, content in files.items():
        (snapshot / name).write_bytes(content)
    return snapshot


def test_hub_file_and_repo_resolve_offline_from_the_cache(settings, tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    save_file(small_state(), tmp_path / "model.safetensors")
    snapshot = populate_hub_cache(
        settings,
        "owner/tiny",
        {"model.safetensors": (tmp_path / "model.safetensors").read_bytes(), "config.json": b"{}"},
    )

    path = fetch(parse_source(f"hf://owner/tiny@{REVISION}/model.safetensors"), settings)
    assert path == snapshot / "model.safetensors"
    assert fetch(parse_source(f"hf://owner/tiny@{REVISION}"), settings) == snapshot
    assert_same(read_state_dict(snapshot), small_state())

    with pytest.raises(WeightsError, match="cannot download hf://owner/other@"):
        fetch(parse_source(f"hf://owner/other@{REVISION}/model.safetensors"), settings)
