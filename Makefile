# Two commands for a fresh machine:  `make demo`  and  `make test`.
# Both set everything up first (system packages, virtualenv, the package, the Kafka jars).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup system-deps demo test lint typecheck unit integration e2e clean

setup: system-deps $(STAMP)
	@$(BIN)/python -c "from vmreplica.devtools.cluster import resolve_kafka; print('Kafka jars:', resolve_kafka())"

system-deps:
	@bash deploy/install-system-deps.sh

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP)

demo: setup
	$(BIN)/python -m vmreplica.devtools.demo

lint: $(STAMP)
	$(BIN)/ruff check .

# mypy cannot follow setuptools' package-dir mapping (producers/ -> vmreplica.producers), so it
# checks a tree of symlinks shaped like the installed package.
typecheck: $(STAMP)
	@rm -rf build/typecheck && mkdir -p build/typecheck/vmreplica
	@for f in vmreplica/*; do ln -s "$$PWD/$$f" build/typecheck/vmreplica/; done
	@for d in producers consumers schemas; do ln -s "$$PWD/$$d" build/typecheck/vmreplica/$$d; done
	MYPYPATH=build/typecheck $(BIN)/mypy --strict -p vmreplica
	MYPYPATH=build/typecheck $(BIN)/mypy --strict tests benchmarks

test: setup lint typecheck
	$(BIN)/pytest

unit: $(STAMP)
	$(BIN)/pytest tests/unit tests/property

clean:
	rm -rf build $(VENV) .mypy_cache .pytest_cache .ruff_cache
