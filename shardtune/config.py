"""Typed run configuration: YAML file + dotted CLI overrides -> validated ``RunConfig``.

Why pydantic v2 rather than dataclasses: we need strict unknown-key rejection
(``extra="forbid"``), coercion of CLI strings into ints/floats/bools/lists, cross-field
checks, and error locations as key paths. Pydantic gives all four, and its error objects
carry the exact ``loc`` we turn into ``train.lr``-style paths with a "did you mean" hint.
"""

from __future__ import annotations

import difflib
import inspect
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from shardtune.errors import ConfigError

STRATEGIES = ("ddp", "fsdp", "zero1", "zero2", "zero3")


class _Section(BaseModel):
    # Attribute docstrings become field descriptions: `shardtune config show --explain KEY`.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class RunSection(_Section):
    name: str = "run"
    output_dir: str = "runs/${run.name}"
    seed: int = 1234


def _existing_local_path(spec: str | None) -> str | None:
    """A name that can only be a local path (absolute, ./, ../, ~, a .gguf file, or more than one
    '/') must exist: else transformers answers "Repo id must be in the form ..." from deep inside."""
    if spec is None or spec.startswith("pkg:") or Path(spec).expanduser().exists():
        return spec
    if spec.startswith(("/", "./", "../", "~")) or spec.endswith(".gguf") or spec.count("/") > 1:
        raise ValueError(f"no such file or directory: {spec}")
    return spec  # a hub id such as org/name


class ModelSection(_Section):
    name_or_path: str | None = None
    """Either a local directory / hub id loaded with from_pretrained ..."""
    config: dict[str, Any] | None = None
    """... or a transformers config (``model_type`` plus its kwargs) for a randomly initialised model."""
    trust_remote_code: bool = False
    revision: str | None = None
    attn_implementation: str = "sdpa"
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    """Recompute activations in backward instead of keeping them: none; full (every transformer block);
    selective (every ``activation_checkpointing_every``-th block, the rest keep theirs: less recompute
    where memory allows). true/false mean full/none.
    """
    activation_checkpointing_every: int = Field(2, ge=2)

    @field_validator("activation_checkpointing", mode="before")
    @classmethod
    def _checkpointing_bool(cls, value: Any) -> Any:
        if isinstance(value, bool):  # configs written before the policies existed
            return "full" if value else "none"
        return value

    @field_validator("name_or_path")
    @classmethod
    def _local_model_exists(cls, value: str | None) -> str | None:
        return _existing_local_path(value)

    @model_validator(mode="after")
    def _one_source(self) -> ModelSection:
        if (self.name_or_path is None) == (self.config is None):
            raise ValueError("set exactly one of model.name_or_path or model.config")
        if self.config is not None and "model_type" not in self.config:
            raise ValueError("model.config needs a 'model_type' key (e.g. llama)")
        return self


class TokenizerSection(_Section):
    name_or_path: str | None = None
    """A local directory / hub id; None means "train a byte-level BPE on the run's text"."""
    vocab_size: int = Field(2048, ge=260)

    @field_validator("name_or_path")
    @classmethod
    def _local_tokenizer_exists(cls, value: str | None) -> str | None:
        return _existing_local_path(value)


class SyntheticDataSection(_Section):
    num_records: int = Field(4000, ge=8)


class SplitRatios(_Section):
    """Shares of records by a hash of their content (data/splits.py), the same for every data path.

    The test split is evaluated once, at the end, with the best checkpoint."""

    train: float = Field(0.90, ge=0.0, le=1.0)
    validation: float = Field(0.05, ge=0.0, le=1.0)
    test: float = Field(0.05, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitRatios:
        if abs(self.train + self.validation + self.test - 1.0) > 1e-9 or self.train == 0:
            raise ValueError("split ratios must sum to 1 with train > 0")
        return self


class HFInputSection(_Section):
    """How ``data prepare`` opens its Hugging Face dataset inputs (``hf:NAME[:CONFIG]`` or a
    ``save_to_disk`` directory; shardtune/data/hf_source.py)."""

    split: str | None = None
    """None: every split of a DatasetDict, in its order (the records are re-split by content hash)."""
    data_files: str | list[str] | dict[str, str | list[str]] | None = None
    """hf:json, hf:parquet, hf:csv"""
    streaming: bool = False
    """read hf:NAME in one pass without downloading or caching it whole"""


class PrepareSection(_Section):
    """``shardtune data prepare``: cleaning, validation, splitting and sharding options."""

    inputs: list[str] = Field(default_factory=list)
    """files or globs; the CLI may give them instead"""
    file_type: Literal["auto", "jsonl", "csv", "parquet"] = "auto"
    """auto = by file suffix"""
    format: Literal["auto", "chat", "prompt_completion", "text", "labelled", "preference"] = "auto"
    on_bad_record: Literal["drop", "error"] = "drop"
    unicode_form: Literal["NFC", "NFKC"] = "NFC"
    """NFC is lossless; NFKC also folds compatibility forms (full-width, superscripts)."""
    allowed_roles: list[str] = Field(default_factory=lambda: ["system", "user", "assistant", "tool"])
    label_names: list[str] | None = None
    """classification labels; None = in order of first appearance"""
    max_tokens: int | None = Field(None, ge=2)
    max_chars: int | Literal["auto"] | None = "auto"
    """Characters per record and per message after normalisation (too_long drops). auto: 32 x data.seq_len, at
    least 8192 (docs/data.md); null: no limit.
    """
    max_message_chars: int | Literal["auto"] | None = "auto"
    overlong: Literal["drop", "truncate"] = "drop"
    near_dedup: bool = True
    near_dedup_threshold: float = Field(0.8, gt=0.0, le=1.0)
    """estimated Jaccard of word 5-grams"""
    near_dedup_min_tokens: int = Field(32, ge=1)
    """Shorter texts (words and punctuation runs) are left to exact dedup after normalisation: MinHash on them
    drops distinct records that differ in a name.
    """
    splits: SplitRatios = SplitRatios()
    shard_tokens: int = Field(1 << 26, ge=1)
    """a shard closes after the document crossing this"""
    chat_template: str | None = None
    """A Jinja chat template; None = the tokenizer's own, else a built-in ChatML-like one."""
    progress: bool = True
    workers: int = Field(1, ge=1)
    """Processes that parse and tokenize (1 = in this process). The output is identical for any count:
    de-duplication, splitting and writing stay in one process, in input order.
    """
    columns: dict[str, str] = Field(default_factory=dict)
    """Hugging Face dataset inputs: shardtune field <- dataset column, e.g. {messages: conversations}."""
    hf: HFInputSection = HFInputSection()

    @field_validator("max_chars", "max_message_chars")
    @classmethod
    def _positive_limit(cls, value: Any) -> Any:
        if isinstance(value, int) and value < 1:
            raise ValueError("must be at least 1 (or auto, or null for no limit)")
        return value


class MixtureSourceSection(_Section):
    """One dataset of ``data.mixture``: a JSONL file, a Hugging Face dataset or a prepared
    directory, and its weight."""

    name: str | None = None
    """default: the file or directory name"""
    path: str | None = None
    """JSONL, hf:NAME[:CONFIG], or a save_to_disk directory"""
    prepared_dir: str | None = None
    weight: float = Field(gt=0, allow_inf_nan=False)
    split: str | None = None
    """For a Hugging Face dataset path, as data.prepare.hf.split / data_files / columns."""
    data_files: str | list[str] | dict[str, str | list[str]] | None = None
    columns: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_input(self) -> MixtureSourceSection:
        if (self.path is None) == (self.prepared_dir is None):
            raise ValueError("set exactly one of path (JSONL or Hugging Face dataset) or prepared_dir")
        return self

    @property
    def label(self) -> str:
        return self.name or Path(self.path or self.prepared_dir).name


class DataSection(_Section):
    source: Literal["synthetic", "jsonl", "prepared"] = "synthetic"
    """``synthetic`` generates the built-in task (no files needed); ``jsonl`` reads prompt/completion or text
    records from ``path``; ``prepared`` memory-maps the shards ``shardtune data prepare`` wrote to
    ``prepared_dir``.
    """
    path: str | None = None
    prepared_dir: str | None = None
    verify_checksums: bool = True
    """Prepared shards are always checked for existence and size when a run opens them; this also hashes each
    (sha256, a sequential read of the split on every rank) against the manifest. Turn off for very large
    prepared sets on trusted storage.
    """
    prepare: PrepareSection = PrepareSection()
    seq_len: int = Field(256, ge=8)
    synthetic: SyntheticDataSection = SyntheticDataSection()
    packing: Literal["concat", "whole_documents"] = "concat"
    """``concat``: documents back to back, cut every seq_len tokens (no padding; a cut may separate a prompt
    from its response). ``whole_documents``: each document whole in one sequence, padded; longer ones
    truncated to seq_len (counted in data_summary.json).
    """
    num_workers: int = Field(0, ge=0)
    """Background threads building the next steps (0 = in the training loop's thread), and how many steps they
    may run ahead.
    """
    prefetch_steps: int = Field(2, ge=1)
    mixture: list[MixtureSourceSection] | None = None
    """Weighted datasets mixed into one order (causal LM); replaces source/path/prepared_dir."""

    @model_validator(mode="after")
    def _path_for_files(self) -> DataSection:
        if self.mixture is not None:
            if not self.mixture:
                raise ValueError("data.mixture needs at least one source")
            # By value, not by fields set: a dumped config (config.yaml) spells out the defaults.
            given = [k for k, default in (("source", "synthetic"), ("path", None), ("prepared_dir", None))
                     if getattr(self, k) != default]
            if given:
                raise ValueError(f"data.mixture replaces data.{'/'.join(given)}: remove them")
            labels = [m.label for m in self.mixture]
            repeated = sorted({x for x in labels if labels.count(x) > 1})
            if repeated:
                raise ValueError(f"data.mixture names must be unique (repeated: {', '.join(repeated)}); set name")
        if self.source == "jsonl" and not self.path:
            raise ValueError("data.source=jsonl needs data.path")
        if self.source == "prepared" and not self.prepared_dir:
            raise ValueError("data.source=prepared needs data.prepared_dir")
        return self


class TrainSection(_Section):
    micro_batch_size: int = Field(4, ge=1)
    global_batch_size: int = Field(8, ge=1)
    """Sequences per optimizer step across all ranks. Fixed in the config so the same config gives the same
    optimisation at any world size; accumulation is derived.
    """
    max_steps: int | None = Field(100, ge=1)
    stop_at_step: int | None = Field(None, ge=1)
    """End this invocation after this step (checkpointing it) while the LR schedule still spans the whole run:
    for time-sliced jobs, and to test exact resumption.
    """
    epochs: float | None = Field(None, gt=0)
    lr: float = Field(1e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    warmup_steps: int = Field(10, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = Field(0.1, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    on_nonfinite: Literal["skip", "stop"] = "skip"
    max_consecutive_nonfinite: int = Field(10, ge=1)
    """Stop anyway after this many consecutive skipped steps: a run that only skips is broken."""
    compile: Literal["none", "blocks", "model"] = "none"
    """torch.compile: none; blocks (each transformer block's forward, compiled before the strategy wraps it,
    so FSDP2's per-block hooks stay outside the graphs); model (the whole forward; ddp, zero1, zero2 only).
    true means blocks.
    """

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_bool(cls, value: Any) -> Any:
        if isinstance(value, bool):
            return "blocks" if value else "none"
        return value

    @model_validator(mode="before")
    @classmethod
    def _epochs_replace_default_steps(cls, data: Any) -> Any:
        # train.epochs alone is the whole budget: the default max_steps must not cap it.
        if isinstance(data, dict) and data.get("epochs") is not None and "max_steps" not in data:
            data = {**data, "max_steps": None}
        return data

    @model_validator(mode="after")
    def _length(self) -> TrainSection:
        if self.max_steps is None and self.epochs is None:
            raise ValueError("set train.max_steps or train.epochs")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"train.global_batch_size ({self.global_batch_size}) must be a multiple of "
                f"train.micro_batch_size ({self.micro_batch_size})"
            )
        return self


class FSDPSection(_Section):
    reshard_after_forward: bool = True
    forward_prefetch: int = Field(0, ge=0)
    """Explicit prefetch: how many following blocks each block all-gathers ahead of need in forward /
    backward. 0 = FSDP2's own default (backward prefetches one block implicitly).
    """
    backward_prefetch: int = Field(0, ge=0)
    reduce_dtype: Literal["auto", "fp32", "bf16"] = "auto"
    """Gradient reduce-scatter dtype under bf16; auto = fp32 (exact sums, twice the bytes)."""


class DistributedSection(_Section):
    strategy: Literal["ddp", "fsdp", "zero1", "zero2", "zero3"] = "ddp"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto = bf16 on CUDA, fp32 on CPU (bf16 without AMX is ~2x slower than fp32 there)."""
    init_timeout_s: float = Field(1800.0, gt=0)
    collective_timeout_s: float = Field(600.0, gt=0)
    rendezvous_interface: str | None = None
    """Under an MPI launcher without MASTER_ADDR: the interface whose IPv4 address rank 0 offers (e.g. ib0);
    None = the one its routes to the other nodes use (distributed/mpi_rendezvous.py).
    """
    fsdp: FSDPSection = FSDPSection()
    deepspeed: dict[str, Any] = Field(default_factory=dict)
    """Raw DeepSpeed keys merged over the generated config (zero strategies only)."""

    @model_validator(mode="after")
    def _deepspeed_only_for_zero(self) -> DistributedSection:
        if self.deepspeed and not self.strategy.startswith("zero"):
            raise ValueError(
                f"distributed.deepspeed is only used by zero1/zero2/zero3, not {self.strategy!r}"
            )
        # Keys shardtune derives from its own config: two sources of truth would disagree.
        for ds_key, ours in _DERIVED_DEEPSPEED_KEYS.items():
            if ds_key in self.deepspeed:
                raise ValueError(f"distributed.deepspeed.{ds_key} is derived from {ours}; set that instead")
        stage = self.deepspeed.get("zero_optimization", {}).get("stage")
        if stage is not None and self.strategy.startswith("zero") and f"zero{stage}" != self.strategy:
            raise ValueError(
                f"distributed.deepspeed.zero_optimization.stage={stage} contradicts "
                f"distributed.strategy={self.strategy}"
            )
        return self


_DERIVED_DEEPSPEED_KEYS = {
    "train_batch_size": "train.global_batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.global_batch_size / (train.micro_batch_size x ranks)",
    "gradient_clipping": "train.max_grad_norm",
    "bf16": "distributed.precision",
    "fp16": "distributed.precision",
    "optimizer": "train.lr / train.betas / train.weight_decay (shardtune builds the optimizer)",
    "scheduler": "train.schedule / train.warmup_steps",
}


class MetricsSection(_Section):
    log_every: int = Field(1, ge=1)
    trackers: list[Literal["tensorboard", "jsonl", "wandb", "mlflow"]] = Field(
        default_factory=lambda: ["tensorboard", "jsonl"])
    """Where rank 0 writes metrics (docs/trackers.md). jsonl is required: the run report, sweeps and the tests
    read metrics.jsonl. wandb and mlflow are extras (shardtune[wandb], [mlflow]).
    """
    progress_bar: bool = True
    peak_tflops_per_rank: float | None = Field(None, gt=0)
    """Peak dense FLOP/s per rank for MFU; None = measured (CPU) or looked up (known GPUs)."""

    @field_validator("trackers")
    @classmethod
    def _jsonl_kept(cls, value: list[str]) -> list[str]:
        if "jsonl" not in value:
            raise ValueError("metrics.trackers must include jsonl (the run report and sweeps read metrics.jsonl)")
        return list(dict.fromkeys(value))


class CheckpointSection(_Section):
    dir: str | None = None
    """default: <run.output_dir>/checkpoints"""
    every_steps: int | None = Field(None, ge=1)
    at_end: bool = True
    keep_last: int = Field(3, ge=1)
    keep_every: int | None = Field(None, ge=1)
    """also keep every n-th step forever"""
    async_save: bool = True
    """Async: the loop waits only while the state is staged to host memory."""
    resume: str = "auto"
    """auto = newest valid checkpoint under dir (corrupt ones skipped with a warning; none at all starts
    fresh, but checkpoints that are all invalid are an error); auto-or-fresh = the same, starting fresh
    when all are invalid; never = start fresh; anything else = that checkpoint (a step, checkpoints or run
    directory), which must be valid.
    """
    verify_on_resume: bool = True
    save_on_signal: bool = True
    """SIGUSR1 / SIGTERM / SIGINT / SIGHUP: every rank saves at the next step boundary and exits with code 75
    (docs/reliability.md has the table).
    """
    on_save_error: Literal["continue", "stop"] = "continue"
    """A failed save (disk full, ...) never leaves a partial checkpoint; then go on or stop."""


class LoraSection(_Section):
    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | None = None
    """Module-name suffixes that get adapters; None = the attention projections of the model family (q/k/v/o
    for Llama-likes, query/key/value for BERT-likes).
    """
    export: Literal["merged", "adapters"] = "merged"
    """``shardtune ckpt export``: merge the adapters into the weights (a plain HF model), or write the
    adapters alone (PEFT's adapter_model.safetensors + adapter_config.json).
    """


class PreferenceSection(_Section):
    """``task: preference`` (docs/iteration.md): DPO on chosen/rejected pairs against the starting model."""

    loss: Literal["dpo", "ipo"] = "dpo"
    """dpo: sigmoid (Rafailov et al.); ipo: squared (Azar et al.)"""
    beta: float = Field(0.1, gt=0)
    """strength of the pull towards the reference model"""
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)
    """dpo: assumed share of flipped preferences"""


class FinetuneSection(_Section):
    """How a pre-trained model is specialised (applied before the parallel strategy wraps it)."""

    strategy: Literal["full", "frozen_head", "lora"] = "full"
    """full: every weight trains. frozen_head: the pre-trained base is frozen, the task head (classification
    head / LM head) and the last ``train_last_blocks`` blocks train. lora: PEFT adapters on
    ``lora.target_modules`` plus the task head.
    """
    train_last_blocks: int = Field(0, ge=0)
    """frozen_head: also train the top k blocks"""
    train_head: bool = True
    """frozen_head / lora: the head (new layers) trains"""
    lora: LoraSection = LoraSection()
    head_lr: float | None = Field(None, gt=0)
    """Discriminative learning rates: head_lr for new/task layers (default: train.lr); the pre-trained top
    block gets train.lr and each block further down x layer_decay.
    """
    layer_decay: float | None = Field(None, gt=0, le=1)
    dropout: float | None = Field(None, ge=0.0, lt=1.0)
    """overrides every dropout rate of the model config"""
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    preference: PreferenceSection = PreferenceSection()


class GenerateSection(_Section):
    """Greedy generation on a sample of prompts, scored by normalised exact match, token F1
    (SQuAD-style) and ROUGE-L (causal LM); any of the three can be eval.metric."""

    samples: int = Field(0, ge=0)
    """Prompts per evaluation (taken evenly across the split; 0 = no generation). A prompt is a document up to
    its last target span (the final assistant turn, or the completion).
    """
    max_new_tokens: int = Field(16, ge=1)
    """every rank runs exactly this many decode steps"""
    micro_batch_size: int | None = Field(None, ge=1)
    """default: train.micro_batch_size"""
    every_eval: bool = True
    """Also generate at every periodic evaluation (needed for eval.metric=exact_match); otherwise only for the
    baseline, the final evaluation and the test split.
    """
    examples: int = Field(3, ge=0)  # rank 0's first generations written to metrics.jsonl / TensorBoard


class EvalSection(_Section):
    every: int | None = Field(None, ge=1)
    """Evaluate the validation split every n optimizer steps (plus before step 1 and at the end). None = only
    before and after training.
    """
    batches: int | None = Field(None, ge=1)
    """cap per validation evaluation (default: all of it)"""
    test_batches: int | None = Field(None, ge=1)
    """cap on the test evaluation (default: the whole split)"""
    split: Literal["validation", "train"] = "validation"
    """Where evaluations run. train is for data without a validation split, and says so in the report."""
    classical: bool = True
    """classification: fit TF-IDF + logistic regression on the training split as a reference row."""
    metric: str = "auto"
    """The metric that decides "best" and early stopping. auto: loss for causal_lm, f1_macro for
    classification. Any logged val/* metric name works (accuracy, perplexity, ...).
    """
    mode: Literal["auto", "min", "max"] = "auto"
    """auto: min for loss/perplexity, else max"""
    patience: int | None = Field(None, ge=1)
    """stop after this many evaluations without improvement"""
    min_delta: float = Field(0.0, ge=0.0)
    save_best: bool = True
    """Save a checkpoint whenever the metric improves (kept by retention) and evaluate the test split once at
    the end with it.
    """
    test_at_end: bool = True
    generate: GenerateSection = GenerateSection()


class RunConfig(_Section):
    run: RunSection = RunSection()
    task: Literal["causal_lm", "classification", "preference"] = "causal_lm"
    """causal_lm: next-token loss on packed sequences. classification: one label per text,
    AutoModelForSequenceClassification with num_labels from the data. preference: DPO/IPO on
    chosen/rejected pairs prepared with data.prepare.format=preference (finetune.preference).
    """
    model: ModelSection
    tokenizer: TokenizerSection = TokenizerSection()
    data: DataSection = DataSection()
    train: TrainSection = TrainSection()
    distributed: DistributedSection = DistributedSection()
    metrics: MetricsSection = MetricsSection()
    checkpoint: CheckpointSection = CheckpointSection()
    finetune: FinetuneSection = FinetuneSection()
    eval: EvalSection = EvalSection()

    @model_validator(mode="after")
    def _paths_and_lengths_fit(self) -> RunConfig:
        for key, path in (("run.output_dir", self.output_dir), ("checkpoint.dir", self.checkpoint_dir)):
            if path.exists() and not path.is_dir():
                raise ValueError(f"{key}={path} exists and is not a directory")
        limit = (self.model.config or {}).get("max_position_embeddings")
        if isinstance(limit, int) and self.data.seq_len > limit:
            raise ValueError(f"data.seq_len={self.data.seq_len} is longer than the model's "
                             f"max_position_embeddings={limit} (model.config)")
        return self

    @model_validator(mode="after")
    def _finetune_fits(self) -> RunConfig:
        ft = self.finetune
        if ft.strategy == "frozen_head" and not ft.train_head and ft.train_last_blocks == 0:
            raise ValueError("finetune.strategy=frozen_head with train_head=false and "
                             "train_last_blocks=0 would train nothing")
        if self.eval.patience is not None and self.eval.every is None:
            raise ValueError("eval.patience (early stopping) needs eval.every")
        if self.eval.generate.samples and self.task != "causal_lm":
            raise ValueError("eval.generate (exact match of generated answers) needs task=causal_lm")
        generated = ("exact_match", "token_f1", "rouge_l")  # scores of generated answers
        if self.eval_metric in generated and not (self.eval.generate.samples and self.eval.generate.every_eval):
            raise ValueError(f"eval.metric={self.eval_metric} needs eval.generate.samples > 0 and "
                             "eval.generate.every_eval")
        return self

    @model_validator(mode="after")
    def _compile_fits_strategy(self) -> RunConfig:
        # Checked at load so `config show` and `plan` refuse what the run would refuse.
        mode, strategy = self.train.compile, self.distributed.strategy
        if mode == "model" and strategy in ("fsdp", "zero3"):
            raise ValueError(
                f"train.compile=model does not work with distributed.strategy={strategy}: the per-block "
                "parameter gathers would run inside the compiled graph; "
                + ("use train.compile=blocks" if strategy == "fsdp" else "use fsdp with train.compile=blocks")
            )
        if mode == "blocks" and strategy == "zero3":
            raise ValueError(
                "train.compile=blocks does not work with distributed.strategy=zero3: ZeRO-3 gathers "
                "every linear layer's weights in hooks inside each block; use fsdp, or train.compile=none"
            )
        return self

    @property
    def eval_metric(self) -> str:
        if self.eval.metric != "auto":
            return self.eval.metric
        return "f1_macro" if self.task == "classification" else "loss"

    @property
    def eval_mode(self) -> str:
        if self.eval.mode != "auto":
            return self.eval.mode
        return "min" if self.eval_metric in ("loss", "perplexity") else "max"

    @property
    def output_dir(self) -> Path:
        return Path(self.run.output_dir.replace("${run.name}", self.run.name))

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else self.output_dir / "checkpoints"


# --------------------------------------------------------------------------------------
# Loading, overrides and error messages


def _valid_keys(model_cls: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model_cls.model_fields.items():
        path = f"{prefix}{name}"
        keys.append(path)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(_valid_keys(annotation, path + "."))
    return keys


def _field_at(path: str):
    """(section class that holds the key, its FieldInfo) for a dotted key such as ``train.lr``."""
    cls, field = RunConfig, None
    for part in path.split("."):
        if cls is None or part not in cls.model_fields:
            hint = nearest_key(path)
            raise ConfigError(f"unknown key {path!r}" + (f" (did you mean {hint!r}?)" if hint else ""))
        field = cls.model_fields[part]
        owner = cls
        annotation = field.annotation
        cls = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return owner, field


def _type_name(annotation) -> str:
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    return text or str(annotation).replace("typing.", "")


def explain_key(path: str) -> str:
    """What ``shardtune config show --explain KEY`` prints: type, default and the field's docstring."""
    owner, field = _field_at(path)
    annotation = field.annotation
    lines = [f"{path}: {_type_name(annotation)}"]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        lines.append("  a section with keys: " + ", ".join(annotation.model_fields))
        doc = inspect.cleandoc(annotation.__doc__ or "")
    else:
        default = field.get_default(call_default_factory=True)
        lines.append(f"  default: {json.dumps(default, default=str)}")
        doc = field.description or ""
    lines += ["  " + line for line in (doc or "(no description)").splitlines()]
    return "\n".join(lines)


def key_space() -> list[str]:
    """Every config key with its type and default, one per line: what the snapshot test pins."""
    out = []
    for key in _valid_keys(RunConfig):
        _, field = _field_at(key)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            out.append(f"{key}: section")
        else:
            out.append(f"{key}: {_type_name(annotation)} = "
                       f"{json.dumps(field.get_default(call_default_factory=True), default=str)}")
    return out


def nearest_key(path: str) -> str | None:
    candidates = _valid_keys(RunConfig)
    parent = path.rsplit(".", 1)[0] if "." in path else ""
    siblings = [k for k in candidates if k.rsplit(".", 1)[0] == parent] if parent else candidates
    for pool in (siblings, candidates):
        match = difflib.get_close_matches(path, pool, n=1, cutoff=0.6)
        if match:
            return match[0]
    return None


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            hint = nearest_key(path)
            lines.append(
                f"  unknown key '{path}'" + (f" (did you mean '{hint}'?)" if hint else "")
            )
        elif e["type"] == "missing":
            lines.append(f"  missing required key '{path}'")
        else:
            where = f"'{path}'" if path else "(top level)"
            got = e.get("input")
            got_text = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"  {where}: {e['msg']}{got_text}")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    # YAML scalars give the type coercion users expect: 3e-4, true, null, [1, 2].
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for depth, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                prefix = ".".join(path[: depth + 1])
                raise ConfigError(f"override {text!r}: '{prefix}' is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


def _budget_from_command_line(data: dict[str, Any], overrides: list[str]) -> None:
    """An override of train.epochs replaces the file's max_steps (and the other way round).

    Otherwise ``sweep --grid train.epochs=1,3`` on a config with ``max_steps: 40`` stops every
    run at step 40. Setting both on the command line keeps both (epochs, capped by max_steps).
    """
    given = {o.split("=", 1)[0] for o in overrides}
    train = data.get("train")
    if not isinstance(train, dict):
        return
    for key, other in (("epochs", "max_steps"), ("max_steps", "epochs")):
        if f"train.{key}" in given and f"train.{other}" not in given and train.get(key) is not None:
            train.pop(other, None)


def load_config(path: str | os.PathLike[str] | None, overrides: list[str] = (), *,
                source: str | None = None) -> RunConfig:
    """Load a YAML config (or the embedded demo default when ``path`` is None).

    ``source`` names the config in error messages when ``path`` is not what the user gave
    (a config recovered from a checkpoint into a temporary file).
    """
    if path is None:
        source = source or "(no config file given: the built-in demo config with the command-line overrides)"
        path = default_config_path()
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping at the top level")
    data = apply_overrides(data, list(overrides))
    _budget_from_command_line(data, list(overrides))
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source or str(path))) from None


def default_config_path() -> Path:
    """The embedded default: the CPU demo shipped inside the package."""
    return Path(__file__).parent / "configs" / "demo-cpu.yaml"


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
