"""The worker's NVIDIA driver floor: the pure comparison with fake versions, and its place at start."""

from __future__ import annotations

import pytest

import worker.__main__ as worker_main
from worker import cuda_driver
from worker.cuda_driver import DriverTooOld, check_driver, parse_version, require_driver, required_driver


@pytest.mark.parametrize(
    ("cuda", "floor"),
    [
        ("13.0", (580, 65, 6)),
        ("12.8", (570, 26)),
        ("12.6", (560, 28, 3)),
        ("12.4", (550, 54, 14)),
    ],
)
def test_floor_per_cuda_release(cuda: str, floor: tuple[int, ...]):
    assert required_driver(cuda) == floor


def test_a_cuda_newer_than_the_table_needs_at_least_the_newest_floor():
    assert required_driver("13.2") == (580, 65, 6)
    with pytest.raises(ValueError):
        required_driver("10.2")


@pytest.mark.parametrize(
    ("cuda", "driver", "ok"),
    [
        ("13.0", "580.65.06", True),
        ("13.0", "590.44.01", True),
        ("13.0", "570.172.08", False),  # R570: most GPU nodes today
        ("13.0", "535.104.05", False),
        ("12.8", "570.26", True),
        ("12.8", "565.57.01", False),
        ("12.6", "560.35.03", True),
        ("12.6", "550.90.07", False),
    ],
)
def test_check_driver(cuda: str, driver: str, ok: bool):
    assert check_driver(cuda, driver).ok is ok


def test_versions_compare_as_numbers_not_text():
    assert parse_version("580.9") < parse_version("580.65.06")
    assert check_driver("13.0", "1000.1").ok


def test_message_names_the_driver_found_and_the_one_needed():
    message = check_driver("13.0", "550.54.15").message
    assert "550.54.15" in message and ">= 580.65.06" in message and "CUDA 13.0" in message
    assert "TORCH_INDEX_URL" in message
    assert "no NVIDIA driver found" in check_driver("13.0", None).message


def test_proc_version_parsing(tmp_path, monkeypatch: pytest.MonkeyPatch):
    proc = tmp_path / "version"
    proc.write_text(
        "NVRM version: NVIDIA UNIX x86_64 Kernel Module  570.172.08  Tue Jul  8 17:51:05 UTC 2025\n"
        "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n"
    )
    monkeypatch.setattr(cuda_driver, "PROC_VERSION", proc)
    assert cuda_driver._proc_driver() == "570.172.08"


def test_require_driver_by_device_setting():
    old, new = (lambda: "550.54.15"), (lambda: "580.82.07")
    cuda13, cpu_build, no_driver = (lambda: "13.0"), (lambda: None), (lambda: None)
    assert require_driver("cpu", cuda=cuda13, driver=old) is None
    assert require_driver("auto", cuda=cuda13, driver=no_driver) is None  # no GPU: auto runs on CPU
    assert require_driver("cuda", cuda=cuda13, driver=new).ok
    for device in (
        "cuda",
        "cuda:1",
        "auto",
    ):  # auto on a GPU host with an old driver must not fall back quietly
        with pytest.raises(DriverTooOld, match=r"550\.54\.15 is too old.*>= 580\.65\.06"):
            require_driver(device, cuda=cuda13, driver=old)
    with pytest.raises(DriverTooOld, match="no NVIDIA driver found"):
        require_driver("cuda", cuda=cuda13, driver=no_driver)
    with pytest.raises(DriverTooOld, match="CPU-only build"):
        require_driver("cuda", cuda=cpu_build, driver=new)


@pytest.fixture
def start_path(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """`python -m worker`'s main with a fake CUDA 13.0 torch and the model loading replaced by a marker."""
    calls: list[str] = []
    monkeypatch.setenv("BIREFNET_DEVICE", "cuda")
    monkeypatch.setattr(cuda_driver, "torch_cuda_version", lambda: "13.0")

    def load(self, app) -> None:
        calls.append("load")
        raise RuntimeError("stop after load")

    monkeypatch.setattr("worker.app.WorkerProcess.load", load)
    return calls


def test_worker_start_exits_before_loading_on_an_old_driver(start_path: list[str], monkeypatch, capsys):
    monkeypatch.setattr(cuda_driver, "read_driver_version", lambda: "570.172.08")
    with pytest.raises(SystemExit) as exited:
        worker_main.main(["--variants", "general-light"])
    assert exited.value.code == 3
    assert start_path == []  # no model load was attempted
    err = capsys.readouterr().err
    assert "570.172.08 is too old" in err and ">= 580.65.06" in err


def test_worker_start_loads_models_after_a_passing_check(start_path: list[str], monkeypatch):
    checked: list[str] = []
    monkeypatch.setattr(cuda_driver, "read_driver_version", lambda: checked.append("check") or "580.95.05")
    with pytest.raises(RuntimeError, match="stop after load"):
        worker_main.main(["--variants", "general-light"])
    assert checked + start_path == ["check", "load"]
