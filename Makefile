# Two commands for a fresh machine:  `make demo`  and  `make test`.
# Both set everything up first (system packages, virtualenv, the package, the Kafka jars).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup system-deps demo test lint typecheck unit integration e2e clean

setup: system-deps $(STAMP)
	@$(BIN)/python -c "from vmreplica.devtools.jars import resolve_kafka; print('Kafka jars:', resolve_kafka())"

# Returns at once when every program is there; apt runs only for packages not yet installed.
system-deps:
	@bash deploy/install-system-deps.sh

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP)

demo: setup
	$(BIN)/python -m vmreplica.devtools.demo

# `ruff format --check` keeps every file in the one format `ruff format .` writes.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The settings, and why the symlink tree, are in pyproject.toml's [tool.mypy].
typecheck: $(STAMP)
	@rm -rf build/typecheck && mkdir -p build/typecheck/vmreplica
	@for f in vmreplica/*; do ln -s "$$PWD/$$f" build/typecheck/vmreplica/; done
	@for d in producers consumers schemas; do ln -s "$$PWD/$$d" build/typecheck/vmreplica/$$d; done
	$(BIN)/mypy

test: setup lint typecheck
	$(BIN)/pytest

unit: $(STAMP)
	$(BIN)/pytest tests/unit tests/property

integration: setup
	$(BIN)/pytest tests/integration

e2e: setup
	$(BIN)/pytest tests/e2e

clean:
	rm -rf build $(VENV) .mypy_cache .pytest_cache .ruff_cache
