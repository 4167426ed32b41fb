"""The worker pools' KEDA scaling, rendered with `kubectl kustomize` and evaluated on sample queue states.

KEDA computes `advanced.scalingModifiers.formula` (expr-lang) over the triggers' metric values, then the HPA
asks for ceil(value / target) replicas (metricType AverageValue) within [minReplicaCount, maxReplicaCount];
a value not above activationTarget leaves the pool at zero. `evaluate` below implements the part of
expr-lang the formula uses (numbers, names, + - * /, comparisons, && || !, the ternary, parentheses)."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path

import pytest
import yaml

from common.domain.variants import BUILTIN_VARIANTS

ROOT = Path(__file__).resolve().parents[2]
OVERLAYS = ["default", "aws"]

_TOKEN = re.compile(r"\s*(?:(\d+(?:\.\d+)?)|([A-Za-z_]\w*)|(&&|\|\||==|!=|<=|>=|[-+*/()<>?:!]))")
_BINARY = {
    "||": 1,
    "&&": 2,
    "==": 3,
    "!=": 3,
    "<": 4,
    ">": 4,
    "<=": 4,
    ">=": 4,
    "+": 5,
    "-": 5,
    "*": 6,
    "/": 6,
}


def evaluate(formula: str, values: dict[str, float]) -> float:
    """Value of an expr-lang formula (the subset above) with trigger names bound to `values`."""
    tokens, pos = [], 0
    while pos < len(formula.rstrip()):
        match = _TOKEN.match(formula, pos)
        if not match:
            raise ValueError(f"unexpected input at {formula[pos:]!r}")
        tokens.append(next(g for g in match.groups() if g is not None))
        pos = match.end()
    tokens.append("")

    def parse(index: int, min_prec: int = 0) -> tuple[float, int]:
        value, index = atom(index)
        while True:
            op = tokens[index]
            if op == "?" and min_prec == 0:
                yes, index = parse(index + 1)
                assert tokens[index] == ":", f"':' expected in {formula!r}"
                no, index = parse(index + 1)
                value = yes if value else no
                continue
            prec = _BINARY.get(op)
            if prec is None or prec < min_prec:
                return value, index
            right, index = parse(index + 1, prec + 1)
            value = {
                "||": lambda a, b: float(bool(a) or bool(b)),
                "&&": lambda a, b: float(bool(a) and bool(b)),
                "==": lambda a, b: float(a == b),
                "!=": lambda a, b: float(a != b),
                "<": lambda a, b: float(a < b),
                ">": lambda a, b: float(a > b),
                "<=": lambda a, b: float(a <= b),
                ">=": lambda a, b: float(a >= b),
                "+": lambda a, b: a + b,
                "-": lambda a, b: a - b,
                "*": lambda a, b: a * b,
                "/": lambda a, b: a / b,
            }[op](value, right)

    def atom(index: int) -> tuple[float, int]:
        token = tokens[index]
        if token == "(":
            value, index = parse(index + 1)
            assert tokens[index] == ")", f"')' expected in {formula!r}"
            return value, index + 1
        if token in ("-", "!"):
            value, index = atom(index + 1)
            return (-value if token == "-" else float(not value)), index
        if re.fullmatch(r"\d+(?:\.\d+)?", token):
            return float(token), index + 1
        if re.fullmatch(r"[A-Za-z_]\w*", token):
            if token not in values:
                raise KeyError(f"{token!r} is not a trigger name")
            return float(values[token]), index + 1
        raise ValueError(f"unexpected {token!r} in {formula!r}")

    value, index = parse(0)
    assert tokens[index] == "", f"trailing input in {formula!r}"
    return value


def test_evaluator():
    assert evaluate("a + b * 2", {"a": 1, "b": 3}) == 7
    assert evaluate("(a + b) * 2", {"a": 1, "b": 3}) == 8
    assert evaluate("a > b ? a : b", {"a": 1, "b": 3}) == 3
    assert evaluate("r + (q + l > w ? q + l : w)", {"r": 1, "q": 2, "l": 2, "w": 3}) == 5
    assert evaluate("a - b - c", {"a": 10, "b": 3, "c": 2}) == 5
    with pytest.raises(KeyError):
        evaluate("nope + 1", {})


@cache
def scaled_objects(overlay: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip("kubectl not installed: the Kubernetes manifests are rendered with `kubectl kustomize`")
    out = subprocess.run(
        [kubectl, "kustomize", str(ROOT / "infra" / "k8s" / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d and d["kind"] == "ScaledObject"]


def replicas(spec: dict, values: dict[str, float]) -> int:
    """Replicas KEDA and the HPA settle on for these trigger values (before the HPA's rate policies)."""
    modifiers = spec["advanced"]["scalingModifiers"]
    assert modifiers.get("metricType", "AverageValue") == "AverageValue"
    value = evaluate(modifiers["formula"], values)
    if value <= float(modifiers.get("activationTarget", "0")):
        return spec.get("minReplicaCount", 0)
    wanted = math.ceil(value / float(modifiers["target"]))
    return max(spec.get("minReplicaCount", 0), min(spec["maxReplicaCount"], wanted))


# (queue, queue_low, waiting, running) -> replicas with maxReplicaCount 4. Broker lists (queue, queue_low)
# are read from Redis directly; waiting/running from Prometheus, which may lag a scrape behind.
CASES = [
    ((0, 0, 0, 0), 0, "nothing to do: zero"),
    ((0, 0, 0, 1), 1, "a running job keeps its worker although the lists are empty"),
    ((0, 0, 0, 3), 3, "a saturated pool does not shrink under load"),
    ((1, 0, 0, 0), 1, "the first message wakes an idle pool before Prometheus sees the job"),
    ((0, 1, 0, 0), 1, "a low-priority job alone wakes the pool too"),
    ((0, 0, 1, 0), 1, "a job IN_QUEUE whose message a worker holds still counts"),
    ((2, 1, 3, 0), 3, "lists and job records describe the same jobs: not counted twice"),
    ((2, 0, 2, 2), 4, "waiting plus running"),
    ((100, 0, 100, 4), 4, "never above maxReplicaCount"),
]


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize(("state", "expected", "why"), CASES, ids=[c[2] for c in CASES])
def test_scaling_formula_on_queue_states(
    overlay: str, state: tuple[int, int, int, int], expected: int, why: str
):
    objects = scaled_objects(overlay)
    assert objects
    for scaled in objects:
        spec = scaled["spec"]
        assert spec["maxReplicaCount"] == 4, "the cases assume maxReplicaCount 4"
        values = dict(zip(("queue", "queue_low", "waiting", "running"), state, strict=True))
        assert replicas(spec, values) == expected, f"{scaled['metadata']['name']}: {why}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_variant_has_a_pool_scaled_on_its_own_work(overlay: str):
    by_target = {s["spec"]["scaleTargetRef"]["name"]: s for s in scaled_objects(overlay)}
    assert set(by_target) == {f"birefnet-worker-{v.id}" for v in BUILTIN_VARIANTS}, "one pool per variant"
    for variant in BUILTIN_VARIANTS:
        spec = by_target[f"birefnet-worker-{variant.id}"]["spec"]
        triggers = {t["name"]: t for t in spec["triggers"]}
        names = set(re.findall(r"[A-Za-z_]\w*", spec["advanced"]["scalingModifiers"]["formula"]))
        assert names == set(triggers), "the formula uses every trigger and only triggers"
        assert triggers["queue"]["metadata"]["listName"] == variant.queue
        assert triggers["queue_low"]["metadata"]["listName"] == variant.queue + "\x06\x169"
        for name in ("queue", "queue_low"):
            trigger = triggers[name]
            assert trigger["type"] == "redis"
            # Address, password and TLS come from the TriggerAuthentication (a Secret), never the manifest.
            assert not {"address", "host", "password", "enableTLS"} & set(trigger["metadata"])
            assert trigger["authenticationRef"] == {"name": "birefnet-redis"}
        for name, metric in (
            ("waiting", "birefnet_queue_waiting_jobs"),
            ("running", "birefnet_jobs_in_progress"),
        ):
            trigger = triggers[name]
            assert trigger["type"] == "prometheus"
            assert trigger["metadata"]["query"] == f'max({metric}{{variant="{variant.id}"}}) or vector(0)'
            assert trigger["metadata"]["serverAddress"].startswith("http"), "set from birefnet-scaling"
        assert spec["minReplicaCount"] == 0 and spec["cooldownPeriod"] >= 60
