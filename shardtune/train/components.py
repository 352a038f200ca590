"""Assemble a run's parts from its config: tokenizer, data, model, strategy."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from shardtune.checkpoint.checkpointer import Checkpointer
from shardtune.checkpoint.trainer_state import TrainerState, TrainProgress
from shardtune.config import RunConfig, dump_config
from shardtune.data.corpus import load_records, record_text
from shardtune.data.datasets import Datasets, build_datasets
from shardtune.data.loader import GlobalBatchLoader
from shardtune.data.tokenizer import load_tokenizer, train_tokenizer
from shardtune.distributed.process_group import DistContext, seed_everything
from shardtune.distributed.strategies import Strategy, build_strategy
from shardtune.errors import ConfigError
from shardtune.models.loading import count_parameters, load_model_tokenizer
from shardtune.models.sharded_load import peak_host_memory_mib
from shardtune.optim import SchedulerState
from shardtune.preference import reference_tables
from shardtune.run_dirs import make_run_dir
from shardtune.tasks import build_task
from shardtune.train.finetune import FinetunePlan, apply_finetuning


@dataclass
class RunParts:
    tokenizer: object
    train_source: object
    val_source: object
    loader: GlobalBatchLoader
    strategy: Strategy
    total_steps: int
    num_params: int
    model_config: object
    task: object = None  # tasks.CausalLMTask | tasks.ClassificationTask
    data: Datasets | None = None
    plan: FinetunePlan | None = None
    reference: object = None  # preference.ReferenceTables of a preference run
    peak_host_memory_mib: float = math.nan  # after loading, max over ranks


def prepare_tokenizer(cfg: RunConfig, ctx: DistContext):
    if cfg.tokenizer.name_or_path:  # a .gguf is imported once (file lock) and loaded from the cache
        return load_model_tokenizer(cfg.tokenizer, cfg.model.trust_remote_code)
    saved = cfg.output_dir / "tokenizer"
    if ctx.is_main:
        texts = (record_text(r) for r in load_records(cfg.data, cfg.run.seed, cfg.task))
        train_tokenizer(texts, cfg.tokenizer.vocab_size, saved)
    # Rank 0 trains once and the rest load the saved files, so every rank has the same vocabulary.
    dist.barrier()
    return load_tokenizer(cfg.tokenizer, cfg.model.trust_remote_code, saved_dir=saved)


def total_optimizer_steps(cfg: RunConfig, loader: GlobalBatchLoader) -> int:
    if cfg.train.epochs is None:
        return cfg.train.max_steps
    by_epochs = math.floor(cfg.train.epochs * loader.steps_per_epoch())
    steps = by_epochs if cfg.train.max_steps is None else min(by_epochs, cfg.train.max_steps)
    if steps < 1:
        raise ValueError(
            f"train.epochs={cfg.train.epochs} is less than one step "
            f"({loader.steps_per_epoch()} steps per epoch)"
        )
    return steps


def build_run(cfg: RunConfig, ctx: DistContext) -> RunParts:
    make_run_dir(cfg.output_dir)  # 0o750: a writable run dir lets others swap checkpoints
    tokenizer = prepare_tokenizer(cfg, ctx)
    data = build_datasets(cfg, tokenizer)
    if ctx.is_main:
        (cfg.output_dir / "config.yaml").write_text(dump_config(cfg))
        (cfg.output_dir / "data_summary.json").write_text(json.dumps(data.summary, indent=1))
    loader = GlobalBatchLoader(
        data.train,
        global_batch_size=cfg.train.global_batch_size,
        micro_batch_size=cfg.train.micro_batch_size,
        rank=ctx.rank,
        world_size=ctx.world_size,
        max_epochs=cfg.train.epochs,
        num_workers=cfg.data.num_workers,
        prefetch_steps=cfg.data.prefetch_steps,
    )
    total_steps = total_optimizer_steps(cfg, loader)
    strategy = build_strategy(cfg, ctx)

    torch.manual_seed(cfg.run.seed)  # identical initial weights (and new heads) on every rank
    # Full on every rank (ddp, zero1/2), or on meta for fsdp/zero3, which load only their shards in setup.
    model = strategy.build_model(tokenizer, data.label_names)
    model_config = model.config
    limit = getattr(model_config, "max_position_embeddings", None)
    if isinstance(limit, int) and cfg.data.seq_len > limit:  # else it fails deep inside torch.cat
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} is longer than the model's "
                          f"max_position_embeddings={limit} ({cfg.model.name_or_path or 'model.config'})")
    # The one place the fine-tuning strategy is applied: before any parallel wrapping.
    model, plan = apply_finetuning(model, cfg.finetune, cfg.train.lr)
    num_params, _ = count_parameters(model)  # before sharding hides the full shapes
    strategy.lr_scales = plan.lr_scales
    strategy.setup(model, total_steps)
    # The loading peak (VmHWM), the largest rank's: what ``shardtune plan``'s host line predicts.
    peak_host = torch.tensor([peak_host_memory_mib()], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(peak_host, op=dist.ReduceOp.MAX)
    seed_everything(cfg.run.seed, ctx.rank)
    return RunParts(
        tokenizer=tokenizer,
        train_source=data.train,
        val_source=data.validation,
        loader=loader,
        strategy=strategy,
        total_steps=total_steps,
        num_params=num_params,
        model_config=model_config,
        task=(task := build_task(cfg, data.num_labels)),
        reference=reference_tables(task, data),
        data=data,
        plan=plan,
        peak_host_memory_mib=float(peak_host),
    )


def tensorboard_hint(log_dir: Path) -> str:
    return f"tensorboard --logdir {log_dir}"


def build_checkpointer(cfg: RunConfig, ctx: DistContext, parts: RunParts, progress: TrainProgress,
                       tracker=None) -> Checkpointer:
    """The checkpointer with every stateful part of the run (``tracker``: the EvalTracker, whose
    baseline, best and patience count a resumed run continues)."""
    stateful = {"loader": parts.loader, "scheduler": SchedulerState(parts.strategy.scheduler)}
    if tracker is not None:
        stateful["eval"] = tracker
    if parts.reference is not None:
        stateful["reference"] = parts.reference  # the reference log-probs, next to the data cursor
    return Checkpointer(
        cfg.checkpoint, cfg.checkpoint_dir, ctx, parts.strategy,
        TrainerState(progress, stateful, cfg.model_dump(mode="json")),
        extras_writer=lambda directory: write_export_extras(directory, parts),
    )


FINETUNE_FILE = "finetune.json"


def finetune_metadata(parts: RunParts) -> dict:
    """What export and ``shardtune eval`` need to rebuild the trained model from a checkpoint."""
    cfg = parts.strategy.cfg
    return {
        "task": cfg.task,
        "label_names": parts.data.label_names if parts.data else None,
        "strategy": cfg.finetune.strategy,
        "lora": {**cfg.finetune.lora.model_dump(), "target_modules": parts.plan.lora_targets}
        if cfg.finetune.strategy == "lora" else None,
        "seq_len": cfg.data.seq_len,
        # Trained parameters outside the adapters (the task head), by checkpoint name.
        "head": [n for n in parts.plan.head if n in parts.plan.lr_scales] if parts.plan else [],
    }


def write_export_extras(directory: Path, parts: RunParts) -> list[str]:
    """Rank 0 stores what ``shardtune ckpt export`` needs to rebuild a Hugging Face model."""
    (directory / "model_config.json").write_text(parts.model_config.to_json_string())
    (directory / FINETUNE_FILE).write_text(json.dumps(finetune_metadata(parts), indent=1))
    tokenizer_dir = directory / "tokenizer"
    parts.tokenizer.save_pretrained(str(tokenizer_dir))
    files = ["model_config.json", FINETUNE_FILE]
    files += sorted(str(p.relative_to(directory)) for p in tokenizer_dir.rglob("*") if p.is_file())
    return files
