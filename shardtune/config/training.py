"""How a run trains, parallelises, logs, checkpoints, fine-tunes and evaluates."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from shardtune.config.base import Section


class TrainSection(Section):
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


class FSDPSection(Section):
    reshard_after_forward: bool = True
    forward_prefetch: int = Field(0, ge=0)
    """Explicit prefetch: how many following blocks each block all-gathers ahead of need in forward /
    backward. 0 = FSDP2's own default (backward prefetches one block implicitly).
    """
    backward_prefetch: int = Field(0, ge=0)
    reduce_dtype: Literal["auto", "fp32", "bf16"] = "auto"
    """Gradient reduce-scatter dtype under bf16; auto = fp32 (exact sums, twice the bytes)."""


class DistributedSection(Section):
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


class MetricsSection(Section):
    log_every: int = Field(1, ge=1)
    trackers: list[Literal["tensorboard", "jsonl", "wandb", "mlflow"]] = Field(
        default_factory=lambda: ["tensorboard", "jsonl"])
    """Where rank 0 writes metrics (docs/trackers.md). jsonl is required: the run report, sweeps and the tests
    read metrics.jsonl. wandb and mlflow are extras (shardtune[wandb], [mlflow]).
    """
    progress_bar: bool = True
    plots: bool = True
    """loss.png and metrics.png beside report.md at the end of a run (about 1.5 s on one CPU core);
    ``shardtune report RUN_DIR`` draws them later for a run that skipped them."""
    peak_tflops_per_rank: float | None = Field(None, gt=0)
    """Peak dense FLOP/s per rank for MFU; None = measured (CPU) or looked up (known GPUs)."""

    @field_validator("trackers")
    @classmethod
    def _jsonl_kept(cls, value: list[str]) -> list[str]:
        if "jsonl" not in value:
            raise ValueError("metrics.trackers must include jsonl (the run report and sweeps read metrics.jsonl)")
        return list(dict.fromkeys(value))


class CheckpointSection(Section):
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


class LoraSection(Section):
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


class PreferenceSection(Section):
    """``task: preference`` (docs/iteration.md): DPO on chosen/rejected pairs against the starting model."""

    loss: Literal["dpo", "ipo"] = "dpo"
    """dpo: sigmoid (Rafailov et al.); ipo: squared (Azar et al.)"""
    beta: float = Field(0.1, gt=0)
    """strength of the pull towards the reference model"""
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)
    """dpo: assumed share of flipped preferences"""


class FinetuneSection(Section):
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


class GenerateSection(Section):
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


class EvalSection(Section):
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
