# make run: serve the built-in LoggingReceiver on 127.0.0.1:2575
# make test: the whole test suite (what CI runs), in a virtualenv of its own
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test run lint format clean docs

$(STAMP): setup.cfg setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test,lint,uvloop]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

run: $(STAMP)
	$(BIN)/hl7bridge serve --endpoint tcp:2575:interface=127.0.0.1

lint: $(STAMP)
	$(BIN)/ruff check hl7bridge tests twisted examples benchmarks
	$(BIN)/ruff format --check hl7bridge tests twisted examples benchmarks
	$(BIN)/mypy hl7bridge

format: $(STAMP)
	$(BIN)/ruff format hl7bridge tests twisted examples benchmarks
	$(BIN)/ruff check --fix hl7bridge tests twisted examples benchmarks

# make docs: the Sphinx pages into docs/_build/html; a warning fails the build
docs: $(STAMP)
	$(BIN)/python -m sphinx -W --keep-going -b html docs docs/_build/html

clean:
	rm -rf $(VENV) .venv-* build *.egg-info .mypy_cache .ruff_cache docs/_build

# make bench: the benchmark of docs/performance.md (about 10 minutes; needs cc and taskset)
BENCH_STAMP := $(VENV)/.bench-installed
.PHONY: bench

$(BENCH_STAMP): setup.cfg setup.py | $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python benchmarks/run.py --write-docs

# make bench-memory: memory per idle connection, 5,000 connections held by each
# listener in turn (its own section of docs/performance.md; about 5 minutes)
.PHONY: bench-memory
bench-memory: $(BENCH_STAMP)
	$(BIN)/python benchmarks/run.py --memory --write-docs
