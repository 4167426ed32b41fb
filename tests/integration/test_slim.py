"""The gateway, producer, webhook deliverer and ops stay slim: importing them never pulls in torch."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_slim_processes_do_not_import_torch():
    modules = sorted(
        ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for package in ("common", "gateway", "producer", "deliverer", "ops")
        for path in (ROOT / package).rglob("*.py")
        if path.name != "__main__.py"
    )
    code = (
        "import importlib, sys\n"
        + "".join(f"importlib.import_module({m!r})\n" for m in modules)
        + (
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', "
            "'transformers'))\n"
            "print(','.join(heavy))\n"
        )
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert len(modules) > 20
    assert result.stdout.strip() == "", f"slim modules import {result.stdout.strip()}"
