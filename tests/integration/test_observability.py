"""The observability pack (infra/k8s/monitoring) against the metrics the code really exports.

Metric names and label names come from the live registry: the module-level metrics of
common/observability/metrics.py, the queue gauges collected from a real redis-server, and the GPU gauges
(collected with a stand-in for torch.cuda, since there is no GPU here). Every alert expression and every
dashboard query may only name those metrics and labels; the alerts also pass `promtool check rules` and the
`promtool test rules` cases in tests/data/alerts (promtool comes from Debian's prometheus package:
`make promtool`)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import types
from functools import cache
from pathlib import Path

import pytest
import yaml
from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

from common.observability import metrics
from common.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "infra" / "k8s" / "monitoring"
ALERT_TESTS = Path(__file__).resolve().parents[1] / "data" / "alerts" / "promtool-tests.yaml"
# Labels Prometheus adds to every scraped series (target and PodMonitor relabelling), not the code.
TARGET_LABELS = {"job", "instance", "namespace", "pod", "container", "endpoint", "component", "le"}
PROMQL_WORDS = {
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "inf",
    "nan",
}


def _family_samples(name: str, kind: str) -> list[str]:
    return {
        "counter": [f"{name}_total"],
        "histogram": [f"{name}_bucket", f"{name}_sum", f"{name}_count"],
    }.get(kind, [name])


@pytest.fixture(scope="module")
def exported(redis_server) -> dict[str, set[str]]:
    """{sample name: label names} of every metric the services export."""
    found: dict[str, set[str]] = {}
    for value in vars(metrics).values():
        if isinstance(value, Counter | Gauge | Histogram):
            assert isinstance(value, MetricWrapperBase)
            kind = value._type  # counter / gauge / histogram
            for sample in _family_samples(value._name, kind):
                found[sample] = set(value._labelnames)
    settings = Settings(redis_url=redis_server.url)
    for family in metrics.QueueCollector(settings).collect():
        found[family.name] = {label for s in family.samples for label in s.labels}
        if family.name != "birefnet_redis_up":
            assert family.samples, f"{family.name}: no sample (are the variants configured?)"
    assert found.get("birefnet_queue_waiting_jobs") == {"variant"}, "the queue gauges were not collected"

    # torch.cuda stand-in: the collector only reads these functions (no GPU on the test machine).
    cuda = types.SimpleNamespace(
        is_available=lambda: True,
        is_initialized=lambda: True,
        device_count=lambda: 1,
        memory_allocated=lambda i: 1,
        memory_reserved=lambda i: 2,
        max_memory_allocated=lambda i: 3,
        mem_get_info=lambda i: (4, 5),
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(__import__("sys").modules, "torch", types.SimpleNamespace(cuda=cuda))
        for family in metrics.GpuMemoryCollector().collect():
            found[family.name] = {label for s in family.samples for label in s.labels}
    assert "birefnet_gpu_memory_bytes" in found
    return found


def promql_names(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) an expression refers to (a tokenizer for the subset the pack uses)."""
    labels = set()
    for block in re.findall(r"\{([^}]*)\}", expr):
        labels |= set(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", block))
    for group in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
        labels |= {g.strip() for g in group.split(",") if g.strip()}
    bare = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    bare = re.sub(r"\{[^}]*\}", " ", bare)
    bare = re.sub(r"\[[^\]]*\]", " ", bare)
    bare = re.sub(r"\b(?:by|without|on|ignoring)\s*\([^)]*\)", " ", bare)
    bare = re.sub(r"\boffset\s+\w+", " ", bare)
    names = {
        m
        for m in re.findall(r"(?<![\w.$])([a-zA-Z_:][\w:]*)(?![\w:])(?!\s*\()", bare)
        if m.lower() not in PROMQL_WORDS
    }
    return names, labels


def check_expression(expr: str, exported: dict[str, set[str]]) -> list[str]:
    names, labels = promql_names(expr)
    problems = [f"{n}: not exported" for n in sorted(names - set(exported))]
    known = set().union(*(exported.get(n, set()) for n in names)) | TARGET_LABELS
    problems += [f"label {label}: not on {sorted(names)}" for label in sorted(labels - known)]
    return problems


@cache
def alert_rules() -> list[dict]:
    doc = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    assert doc["kind"] == "PrometheusRule"
    return [rule for group in doc["spec"]["groups"] for rule in group["rules"]]


@cache
def dashboard() -> dict:
    return json.loads((MONITORING / "grafana-dashboard.json").read_text())


def dashboard_queries() -> list[tuple[str, str]]:
    return [
        (panel["title"], target["expr"])
        for panel in dashboard()["panels"]
        for target in panel.get("targets", [])
    ]


def test_promql_tokenizer_sees_names_and_labels():
    names, labels = promql_names(
        'histogram_quantile(0.95, sum by (variant, le) (rate(a_bucket{stage="x"}[5m]))) '
        '/ ignoring(kind) b{kind="t"} > 76e9 and on (variant) c offset 15m'
    )
    assert names == {"a_bucket", "b", "c"}
    assert labels == {"variant", "le", "stage", "kind"}


def test_the_alerts_the_pack_promises_exist():
    names = {rule["alert"] for rule in alert_rules()}
    assert names == {
        "BirefnetOldestJobWaiting",
        "BirefnetJobsWaitingWithNoWorker",
        "BirefnetDeadLettersGrowing",
        "BirefnetUntrainedModelServed",
        "BirefnetWebhookGiveUps",
        "BirefnetRedisDown",
        "BirefnetGpuMemoryNearLimit",
    }
    for rule in alert_rules():
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_alert_expressions_use_exported_metrics(exported):
    problems = {rule["alert"]: check_expression(rule["expr"], exported) for rule in alert_rules()}
    assert not any(problems.values()), problems


def test_dashboard_queries_use_exported_metrics(exported):
    queries = dashboard_queries()
    assert len(queries) >= 20
    problems = {f"{title}: {expr}": check_expression(expr, exported) for title, expr in queries}
    assert not any(problems.values()), {k: v for k, v in problems.items() if v}
    # What the dashboard promises: queues, latency p50/p95 per variant, throughput, errors, workers, GPU, RED.
    joined = "\n".join(expr for _, expr in queries)
    for needed in (
        "birefnet_queue_waiting_jobs",
        "birefnet_jobs_in_progress",
        "histogram_quantile(0.5",
        "histogram_quantile(0.95",
        "birefnet_jobs_completed_total",
        "birefnet_job_errors_total",
        "birefnet_workers_online",
        "birefnet_gpu_memory_bytes",
        "birefnet_http_requests_total",
        "birefnet_http_request_duration_seconds_bucket",
    ):
        assert needed in joined, needed
    variable = next(v for v in dashboard()["templating"]["list"] if v["name"] == "variant")
    assert (
        check_expression(re.sub(r"label_values\((\w+), (\w+)\)", r"\1", variable["definition"]), exported)
        == []
    )


def test_untested_metric_names_are_caught(exported):
    """The check is not vacuous: a misspelt metric or label is reported."""
    assert check_expression("max(birefnet_queue_waiting_job)", exported) == [
        "birefnet_queue_waiting_job: not exported"
    ]
    assert check_expression('max by (model) (birefnet_queue_waiting_jobs{variant="x"})', exported) == [
        "label model: not on ['birefnet_queue_waiting_jobs']"
    ]


def promtool() -> str:
    found = shutil.which("promtool")
    if not found:
        pytest.skip("promtool not installed (make promtool: Debian's prometheus package)")
    return found


def test_alert_rules_pass_promtool(tmp_path: Path):
    rules = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())["spec"]
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": rules["groups"]}, sort_keys=False))
    shutil.copy(ALERT_TESTS, tmp_path / "tests.yaml")
    check = subprocess.run(
        [promtool(), "check", "rules", "rules.yaml"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr
    test = subprocess.run(
        [promtool(), "test", "rules", "tests.yaml"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert test.returncode == 0, test.stdout + test.stderr
    tested = set(re.findall(r"alertname: (\w+)", ALERT_TESTS.read_text()))
    assert tested == {rule["alert"] for rule in alert_rules()}, "every alert has promtool cases"


def test_dashboard_queries_parse(tmp_path: Path):
    """promtool parses every dashboard query (as recording rules; Grafana's $variant as a regex)."""
    rules = [
        {"record": f"dashboard:q{i}", "expr": expr.replace("$variant", ".*")}
        for i, (_, expr) in enumerate(dashboard_queries())
    ]
    (tmp_path / "dash.yaml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    check = subprocess.run(
        [promtool(), "check", "rules", "dash.yaml"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_monitoring_kustomization_renders_every_component_monitor():
    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip("kubectl not installed")
    out = subprocess.run([kubectl, "kustomize", str(MONITORING)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    monitors = {
        d["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"]: d
        for d in docs
        if d["kind"] == "PodMonitor"
    }
    assert set(monitors) == {"gateway", "producer", "webhooks", "worker"}
    for monitor in monitors.values():
        assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]
    dash = next(d for d in docs if d["kind"] == "ConfigMap")
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dash["data"]["birefnet.json"]) == dashboard()
    assert any(d["kind"] == "PrometheusRule" for d in docs)
