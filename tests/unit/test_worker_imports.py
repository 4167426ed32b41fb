"""The worker's modules import one another without a cycle, and no product module imports the tests.

An AST walk of every module under worker/ (imports anywhere in a module, deferred ones inside functions
included; only `if TYPE_CHECKING:` blocks, which never run, are left out)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("worker", "common", "gateway", "producer", "deliverer", "ops")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """Modules `path` imports at run time (a `from a.b import c` counts a.b, and a.b.c when that is a
    module)."""
    tree = ast.parse(path.read_text())
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(inner) for inner in ast.walk(node))
    names: set[str] = set()
    package = module_name(path).rsplit(".", 0 if path.name == "__init__.py" else 1)[0]
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def graph(top: str) -> dict[str, set[str]]:
    modules = {module_name(p): p for p in (ROOT / top).rglob("*.py")}
    return {name: {m for m in imported(path) if m in modules and m != name} for name, path in modules.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_worker_modules_import_without_a_cycle():
    edges = graph("worker")
    assert len(edges) > 30 and "worker.pipeline.types" in edges
    cycle = find_cycle(edges)
    assert cycle is None, " -> ".join(cycle or [])


def test_the_pipeline_stages_depend_only_on_the_shared_types_and_each_other():
    edges = graph("worker")
    for name, targets in edges.items():
        if name.startswith("worker.pipeline."):
            outside = {t for t in targets if not t.startswith("worker.pipeline") and t != "worker.timings"}
            assert not outside, f"{name} imports {sorted(outside)}"


def test_no_product_module_imports_the_tests():
    for top in PRODUCT:
        for path in (ROOT / top).rglob("*.py"):
            assert not any(m == "tests" or m.startswith("tests.") for m in imported(path)), path
            assert "tests." not in "".join(
                line for line in path.read_text().splitlines() if "import_module" in line
            ), path
