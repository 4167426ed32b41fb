"""The lock is what every install uses: `make lock-check` (run by `make test`) passes on the committed lock
and fails, naming the fix, when pyproject.toml changes without `make lock`."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
LOCK_FILES = ["pyproject.toml", "uv.lock", "Makefile"]


def _lock_check(workdir: Path) -> subprocess.CompletedProcess[str]:
    # -o: use this venv as it is (do not rebuild it for the copied pyproject.toml).
    return subprocess.run(
        ["make", "-C", str(workdir), "-o", ".venv/.installed-stamp", "lock-check", f"BIN={BIN}"],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    if not (BIN / "uv").exists():
        pytest.fail("uv is a locked dev dependency; install with `make install`")
    for name in LOCK_FILES:
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "requirements", tmp_path / "requirements")
    return tmp_path


def test_committed_lock_matches(checkout: Path) -> None:
    result = _lock_check(checkout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "uv.lock matches pyproject.toml" in result.stdout


def test_unlocked_dependency_fails(checkout: Path) -> None:
    pyproject = checkout / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('"rich>=13",', '"rich>=13",\n    "tabulate>=0.9",', 1))
    result = _lock_check(checkout)
    assert result.returncode != 0
    assert "run 'make lock'" in result.stdout + result.stderr


def test_stale_export_fails(checkout: Path) -> None:
    app = checkout / "requirements" / "app.txt"
    app.write_text(re.sub(r"^redis==\S+", "redis==5.0.0", app.read_text(), count=1, flags=re.M))
    result = _lock_check(checkout)
    assert result.returncode != 0
    assert "requirements/app.txt is not what uv.lock exports" in result.stdout + result.stderr


def test_every_set_is_fully_pinned_with_hashes() -> None:
    """pip's --require-hashes needs `==` and a hash on every line; the app set must not carry torch."""
    for name in ("app", "worker", "dev", "build", "scan"):
        text = (ROOT / "requirements" / f"{name}.txt").read_text()
        entries = re.findall(r"^([A-Za-z0-9_.-]+)(==|>=|<=|~=|>|<)?(\S*)", text, re.M)
        assert entries, name
        for package, op, _ in entries:
            assert op == "==", f"{name}.txt: {package} is not pinned exactly"
        blocks = re.split(r"\n(?=[A-Za-z0-9_.-]+==)", text.split("\n", 2)[2])
        assert all("--hash=sha256:" in block for block in blocks if block.strip()), name
    app = (ROOT / "requirements" / "app.txt").read_text()
    assert not re.search(r"^(torch|torchvision|nvidia-)", app, re.M)


def test_locked_versions_are_installed() -> None:
    """This venv holds exactly the dev set's versions (what CI tests is what the lock says)."""
    from importlib.metadata import version

    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    locked = {p["name"]: p["version"] for p in lock["package"]}
    for package in (
        "torch",
        "celery",
        "kombu",
        "redis",
        "fastapi",
        "starlette",
        "opencv-python-headless",
        "transformers",
        "mypy",
        "pytest",
        "moto",
    ):
        assert version(package) == locked[package], package


# In the subprocess below: imports of installed distributions that requirements/app.txt does not list
# fail, as they would in the app images, which install only that file.
_APP_ONLY = """
import importlib, importlib.metadata as md, re, sys
allowed = {re.sub(r"[-_.]+", "-", m.lower()) for m in re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==",
open(sys.argv[1]).read(), re.M)}
allowed.add("birefnet-serve")  # the project itself
owners = md.packages_distributions()
class AppLockOnly:
    def find_spec(self, name, path=None, target=None):
        dists = owners.get(name.split(".")[0])
        if dists and not any(re.sub(r"[-_.]+", "-", d.lower()) in allowed for d in dists):
            raise ModuleNotFoundError(f"{name} (from {', '.join(sorted(set(dists)))}) is not in app.txt")
        return None
sys.meta_path.insert(0, AppLockOnly())
for module in sys.argv[2:]:
    importlib.import_module(module)
print(",".join(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "transformers"))))
"""


def test_the_slim_packages_import_with_only_the_app_lock() -> None:
    # The gateway, producer, deliverer and ops images install requirements/app.txt alone.
    modules = sorted(
        ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for package in ("common", "gateway", "producer", "deliverer", "ops")
        for path in (ROOT / package).rglob("*.py")
        if path.name != "__main__.py"
    )
    assert len(modules) > 20
    result = subprocess.run(
        [sys.executable, "-c", _APP_ONLY, str(ROOT / "requirements" / "app.txt"), *modules],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "", f"the slim packages import {result.stdout.strip()}"


def test_the_dependabot_configuration_is_valid_and_watches_the_lock() -> None:
    config = ROOT / ".github" / "dependabot.yml"
    result = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.dependabot", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert 'package-ecosystem: "uv"' in config.read_text()
