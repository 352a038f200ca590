# Two commands work on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# The CPU wheel: an unpinned torch would pull several GB of CUDA packages.
TORCH_PIN ?= torch==2.13.0
STAMP  := $(VENV)/.installed

export DS_ACCELERATOR ?= cpu
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export PYTHONWARNINGS ?= ignore::FutureWarning
# DeepSpeed JIT-compiles its CPU ops here once; tests and the demo reuse the cache.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: demo test test-fast bench lint install warm clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_PIN)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/shardtune launch --nproc 2

# Build DeepSpeed's CPU communication op in one process before tests run ranks in parallel,
# or the first multi-rank test races the compile.
warm: $(STAMP)
	$(PY) -m shardtune.distributed.warm

test: warm
	$(PY) -m pytest -q -p no:cacheprovider tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m "not distributed" tests

bench: $(STAMP)
	$(PY) bench/throughput.py

lint: $(STAMP)
	$(VENV)/bin/ruff check shardtune tests bench

clean:
	rm -rf runs .cache .pytest_cache
