# The two commands of the README: `make demo` and `make test`.
# Each bootstraps what it needs: a virtualenv in .venv and anvil (npm) in .tools.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
ANVIL := .tools/node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil
STAMP := $(VENV)/.installed
# Two test processes (pytest-xdist; each test has its own database): on a 2-core machine
# the suite took 15:44 instead of 17:45 in one. PYTEST_ARGS= runs it in one process.
PYTEST_ARGS ?= -n 2

.PHONY: demo test lint bench setup clean

setup: $(STAMP) $(ANVIL)
	@# An editable install leaves the package uncompiled, and with PYTHONDONTWRITEBYTECODE
	@# (set on some machines) every run would compile it again: ~50 ms of each start-up.
	@$(BIN)/python -m compileall -q src/gapfill

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

$(ANVIL): .tools/package.json
	cd .tools && npm install --no-audit --no-fund --silent
	test -x $(ANVIL)
	touch $(ANVIL)

demo: setup
	$(BIN)/gapfill demo $(DEMO_ARGS)

lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: setup
	bench/run

clean:
	rm -rf $(VENV) .tools/node_modules .pytest_cache .mypy_cache gapfill.db gapfill.db-* gapfill-demo.db gapfill-demo.db-*
