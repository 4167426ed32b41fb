"""The documentation a reader follows is true: the site builds strictly (mkdocs: every page in the nav
exists, every link and anchor between pages resolves), and the README and the pages name only files,
make targets and links that exist. Product text states its own contract: no pointers to notes outside
the repository, no development history."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from markdown.extensions.toc import slugify

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PRODUCT_CODE = ["common", "producer", "deliverer", "worker", "ops", "devstack", "bench"]

# A repository path as the pages write it: `worker/samples/chelsea.jpg`, bench/bench_model.py, infra/k8s/.
REPO_PATH = re.compile(
    r"(?<![\w./<:-])((?:common|producer|deliverer|worker|ops|devstack|bench|tests|infra|docs|\.ci)/[\w./-]*)"
)
MAKE_TARGET = re.compile(r"(?:`|^)make ([a-z][\w-]*)", re.M)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def prose(text: str) -> str:
    """The text outside fenced code blocks (headings inside code are not headings)."""
    return FENCE.sub("", text)


def anchors(page: Path) -> set[str]:
    headings = re.findall(r"^#{1,6} +(.+?) *$", prose(page.read_text()), re.M)
    return {slugify(heading.replace("`", ""), "-") for heading in headings}


def test_site_builds_strictly(tmp_path):
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert (site / "index.html").is_file() and (site / "api" / "index.html").is_file()


def test_named_repository_paths_exist():
    missing = []
    for page in PAGES:
        for match in REPO_PATH.finditer(page.read_text()):
            path = match.group(1).rstrip(".")
            if page.read_text()[match.end() : match.end() + 1] in "<{*":
                continue  # a pattern such as variants/<variant-id>, not a file
            if not (ROOT / path).exists():
                missing.append(f"{page.relative_to(ROOT)}: {path}")
    assert not missing, missing


def test_named_make_targets_exist():
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
    unknown = [
        f"{page.relative_to(ROOT)}: make {name}"
        for page in PAGES
        for name in MAKE_TARGET.findall(page.read_text())
        if name not in targets
    ]
    assert not unknown, unknown


def test_readme_links_and_anchors_resolve():
    """The README is not part of the site, so mkdocs does not check its links: this does."""
    readme = ROOT / "README.md"
    broken = []
    for target in LINK.findall(prose(readme.read_text())):
        if re.match(r"[a-z]+:", target):
            continue  # an external URL
        path, _, anchor = target.partition("#")
        linked = (readme.parent / path) if path else readme
        if not linked.is_file() or (anchor and anchor not in anchors(linked)):
            broken.append(target)
    assert not broken, broken


def test_readme_stays_short():
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= 200, f"README.md has {lines} lines; move detail into docs/"


def test_product_text_states_its_own_contract():
    """No issue numbers, progress notes or pointers to files outside the repository in docs, code or tests."""
    banned = re.compile(r"\bissue #?\d+|#1\d\b|\bnot met\b|\.\./shared|FAL_API\.md|no GPU lent", re.I)
    code = [path for name in [*PRODUCT_CODE, "tests"] for path in (ROOT / name).rglob("*.py")]
    files = PAGES + [
        path for path in code if path != Path(__file__).resolve() and "node_modules" not in path.parts
    ]
    found = [
        f"{path.relative_to(ROOT)}: {match.group(0)}"
        for path in files
        for match in banned.finditer(path.read_text())
    ]
    assert not found, found
