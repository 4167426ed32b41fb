"""common/domain holds rules and data only (docs/architecture.md): no module in it talks to Redis, S3 or
Celery, or reaches the layers that do (common.state, common.adapters)."""

import ast
from pathlib import Path

DOMAIN = Path(__file__).resolve().parents[2] / "common" / "domain"
FORBIDDEN = ("redis", "boto3", "botocore", "celery", "kombu", "common.state", "common.adapters")


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against the file's own package
                package = ["common", "domain"][: 3 - node.level]
                base = ".".join(package + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def forbidden(name: str) -> bool:
    return any(name == root or name.startswith(root + ".") for root in FORBIDDEN)


def test_domain_modules_import_no_io_layer():
    files = sorted(DOMAIN.rglob("*.py"))
    assert len(files) >= 5, "the domain package moved?"
    found = {f"{path.name}: {name}" for path in files for name in imported_modules(path) if forbidden(name)}
    assert not found, f"common/domain must stay pure, but imports {sorted(found)}"


def test_the_check_sees_a_forbidden_import(tmp_path):
    """The walk finds imports inside functions and relative ones, so the test above cannot pass vacuously."""
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    import redis.asyncio\n    from ..state import keys\n")
    assert {name for name in imported_modules(sample) if forbidden(name)} == {
        "redis.asyncio",
        "common.state",
        "common.state.keys",
    }
