# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-integration test-all bench install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# The CPU build of torch first: an unpinned torch would pull several GB of CUDA packages.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/pytest

# End-to-end runs, other tools and tests that start processes: CI runs them after `make test`.
test-integration: $(STAMP)
	$(BIN)/pytest -m "integration and not slow and not gpu"

test-all: $(STAMP)
	$(BIN)/pytest -m "not gpu"

demo: $(STAMP)
	$(BIN)/dirl demo --config configs/demo.yaml

# Every benchmark in turn (`make bench ARGS=--quick` for the seconds-long settings);
# one alone: `.venv/bin/python -m benchmarks.NAME [--quick]`.
bench: $(STAMP)
	$(BIN)/python -m benchmarks $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
