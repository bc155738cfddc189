# ccr: the two entry points (see README.md) and their set-up.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ccr-installed

.PHONY: setup demo test lint bench clean

$(STAMP): pyproject.toml ccr/data/install-criu.sh scripts/install-criu.sh scripts/setup.sh
	bash scripts/setup.sh
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/python scripts/demo.py

test: setup
	$(BIN)/python -m pytest -q tests

lint: setup
	$(BIN)/ruff check ccr tests scripts
	$(BIN)/ruff format --check ccr tests scripts
	$(BIN)/mypy ccr

bench: setup
	$(BIN)/python scripts/bench.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
