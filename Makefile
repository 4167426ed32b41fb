# One venv for everything; `make test` and `make demo` create it on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install test demo up lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[worker,dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra

demo: $(STAMP)
	$(BIN)/python -m devstack demo

up: $(STAMP)
	$(BIN)/python -m devstack up

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python bench/bench_model.py
	$(BIN)/python bench/bench_engine.py

clean:
	rm -rf $(VENV) out .pytest_cache
