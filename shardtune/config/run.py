"""The whole run config, and the checks that span its sections."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import model_validator

from shardtune.config.base import Section
from shardtune.config.data import DataSection
from shardtune.config.model import ModelSection, RunSection, TokenizerSection
from shardtune.config.training import (
    CheckpointSection,
    DistributedSection,
    EvalSection,
    FinetuneSection,
    MetricsSection,
    TrainSection,
)


class RunConfig(Section):
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
