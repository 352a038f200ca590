"""``shardtune eval CHECKPOINT_OR_HF_DIR --split test``: evaluate a trained model in one process.

A shardtune checkpoint is first exported to a temporary Hugging Face directory (LoRA
adapters merged), so a checkpoint written by any strategy at any world size evaluates the
same way. The data split comes from the run config stored in the checkpoint, or from a
config given on the command line (required for a plain Hugging Face directory).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from shardtune.config import RunConfig, load_config
from shardtune.errors import ConfigError


class _Runner:
    """The slice of the Strategy interface ``evaluate`` uses, for a plain module."""

    def __init__(self, model, ctx):
        self.model, self.ctx = model, ctx

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    def autocast(self):
        import contextlib

        return contextlib.nullcontext()


def config_for(path: Path, config: str | None, overrides: list[str]) -> RunConfig:
    from shardtune.checkpoint.manifest import TRAINER_STATE
    from shardtune.errors import CheckpointError
    from shardtune.integrity import read_json_object

    if config is not None:
        return load_config(config, overrides)
    state_file = path / TRAINER_STATE
    if not state_file.is_file():
        raise ConfigError(f"{path} is not a shardtune checkpoint: give the run config that defines its data")
    import yaml

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as fh:
        yaml.safe_dump(read_json_object(state_file, CheckpointError, "checkpoint file").get("config") or {}, fh)
    return load_config(fh.name, overrides, source=f"{state_file} (the config saved with the checkpoint)")


def evaluate_model_dir(model_dir: Path, cfg: RunConfig, split: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from shardtune.data.datasets import build_datasets
    from shardtune.distributed.process_group import init_distributed, shutdown
    from shardtune.eval.evaluate import evaluate
    from shardtune.tasks import build_task

    ctx = init_distributed(cfg.distributed.init_timeout_s, cfg.distributed.collective_timeout_s,
                           cfg.distributed.rendezvous_interface)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        data = build_datasets(cfg, tokenizer)
        source = {"train": data.train, "validation": data.validation, "test": data.test}[split]
        if source is None:
            raise ConfigError(f"the data of this config has no {split!r} split (set data.prepare.splits.test)")
        auto = AutoModelForSequenceClassification if cfg.task == "classification" else AutoModelForCausalLM
        model = auto.from_pretrained(str(model_dir), dtype=torch.float32).to(ctx.device)
        model.config.use_cache = False
        if cfg.task == "classification":
            trained = [model.config.id2label[i] for i in range(model.config.num_labels)]
            if trained != data.label_names:
                raise ConfigError(f"the model's labels {trained} differ from the data's {data.label_names}")
        sequences = source.epoch(0)  # the order does not change the metrics
        runner = _Runner(model, ctx)
        if cfg.task == "preference":
            from shardtune.preference import reference_logps

            # No starting model here: the model is its own reference, so rewards are 0 and the
            # reference-free metrics (logp_accuracy, log-probs) are the ones that compare models.
            source.reference = reference_logps(runner, build_task(cfg), source.pairs(), rank=ctx.rank,
                                               micro_batch_size=cfg.train.micro_batch_size, world_size=ctx.world_size)
        metrics = evaluate(
            runner, build_task(cfg, data.num_labels), sequences,
            micro_batch_size=cfg.train.micro_batch_size, rank=ctx.rank, world_size=ctx.world_size,
            label_names=data.label_names,
        )
        gen = cfg.eval.generate
        if gen.samples:  # the same prompts and scoring as the run's own evaluations
            from shardtune.eval.generate import evaluate_generation, generation_samples

            samples = generation_samples(source, gen.samples, max(1, cfg.data.seq_len - gen.max_new_tokens))
            generated = evaluate_generation(
                runner, tokenizer, samples, micro_batch_size=gen.micro_batch_size or cfg.train.micro_batch_size,
                max_new_tokens=gen.max_new_tokens, rank=ctx.rank, world_size=ctx.world_size,
            )
            metrics.update({k: v for k, v in generated.items() if k != "generations"})
        return metrics
    finally:
        shutdown()
