"""Parallelism strategies. ``build_strategy`` is the one place a strategy is chosen."""

from __future__ import annotations

from shardtune.config import RunConfig
from shardtune.distributed.process_group import DistContext
from shardtune.distributed.strategies.base import StepOutcome, Strategy


def build_strategy(cfg: RunConfig, ctx: DistContext) -> Strategy:
    name = cfg.distributed.strategy
    if name == "ddp":
        from shardtune.distributed.strategies.ddp import DDPStrategy

        return DDPStrategy(cfg, ctx)
    if name == "fsdp":
        from shardtune.distributed.strategies.fsdp import FSDPStrategy

        return FSDPStrategy(cfg, ctx)
    from shardtune.distributed.strategies.zero import ZeroStrategy

    return ZeroStrategy(cfg, ctx, stage=int(name.removeprefix("zero")))


__all__ = ["Strategy", "StepOutcome", "build_strategy"]
