# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo demo-dream demo-llada test test-integration test-all bench install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# The CPU build of torch first: an unpinned torch would pull several GB of CUDA packages.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	# Bubblewrap isolates the code rewards' programs (src/dirl/rewards/sandbox.py). Installed when
	# we are root with apt-get; otherwise the sandbox falls back (unshare, then rlimits) with a warning.
	@command -v bwrap >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
		&& (apt-get update -qq && apt-get install -y -qq bubblewrap) >/dev/null 2>&1; } \
		|| echo "note: bubblewrap not installed; code rewards will run in a weaker sandbox"
	touch $(STAMP)

install: $(STAMP)

# One pytest process per core (at most 4: each imports torch); every test is independent of order.
test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/pytest -n auto --maxprocesses 4

# End-to-end runs, other tools and tests that start processes: CI runs them after `make test`.
test-integration: $(STAMP)
	$(BIN)/pytest -m "integration and not slow and not gpu"

test-all: $(STAMP)
	$(BIN)/pytest -m "not gpu"

demo: $(STAMP)
	$(BIN)/dirl demo --config configs/demo.yaml

# The same pipeline on full-attention models: Dream-family (AR-initialised, configs/demo-dream.yaml)
# and LLaDA-family (masked diffusion from scratch, configs/demo-llada.yaml).
demo-dream: $(STAMP)
	$(BIN)/dirl demo --config configs/demo-dream.yaml

demo-llada: $(STAMP)
	$(BIN)/dirl demo --config configs/demo-llada.yaml

# Every benchmark in turn (`make bench ARGS=--quick` for the seconds-long settings);
# one alone: `.venv/bin/python -m benchmarks.NAME [--quick]`.
bench: $(STAMP)
	$(BIN)/python -m benchmarks $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
