"""AdamW with decay/no-decay parameter groups, and the learning-rate schedules."""

from __future__ import annotations

import math

import torch

from shardtune.config import TrainSection


def param_groups(
    model: torch.nn.Module, weight_decay: float, lr: float | None = None,
    lr_scales: dict[str, float] | None = None,
) -> list[dict]:
    """Trainable parameters grouped by (learning-rate scale, decay or not).

    Norm weights and biases are 1-D; decaying them pulls scales toward zero for no gain, so
    they never decay. ``lr_scales`` (parameter name -> multiplier on ``lr``, from
    ``finetune.apply_finetuning``) gives discriminative / layer-wise learning rates; each
    group carries its own ``lr``, which the scheduler's multiplier then scales.
    """
    buckets: dict[tuple[float, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        scale = 1.0 if lr_scales is None else lr_scales.get(name, 1.0)
        # A parameter partitioned by deepspeed.zero.Init is a flat stub; ds_shape is its shape.
        ndim = len(param.ds_shape) if hasattr(param, "ds_shape") else param.ndim
        buckets.setdefault((scale, ndim >= 2), []).append(param)
    uniform = len({scale for scale, _ in buckets}) <= 1
    groups = []
    for (scale, decays), params in sorted(buckets.items(), key=lambda kv: (-kv[0][0], not kv[0][1])):
        name = "decay" if decays else "no_decay"
        group = {"params": params, "weight_decay": weight_decay if decays else 0.0,
                 "name": name if uniform else f"{name}@{scale:.4g}", "lr_scale": scale}
        if lr is not None:
            group["lr"] = lr * scale
        groups.append(group)
    if not groups:
        raise ValueError("no trainable parameters")
    return groups


def build_optimizer(model: torch.nn.Module, cfg: TrainSection, lr_scales: dict[str, float] | None = None) -> torch.optim.Optimizer:
    kwargs = {}
    if any(p.is_cuda for p in model.parameters()):
        kwargs["fused"] = True
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay, cfg.lr, lr_scales), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, **kwargs
    )


def lr_multiplier(step: int, cfg: TrainSection, total_steps: int) -> float:
    """Multiplier on ``cfg.lr`` for optimizer step ``step`` (0-based)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    if cfg.schedule == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def build_scheduler(optimizer, cfg: TrainSection, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, cfg, total_steps)
    )


def restore_scheduler(scheduler, state: dict) -> None:
    """Load a scheduler's position and put its learning rates back on the optimizer.

    ``LambdaLR.load_state_dict`` restores the step count but leaves the optimizer at the
    fresh scheduler's step-0 rate, so the first update after a resume would use it.
    """
    scheduler.load_state_dict(state)
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr(), strict=True):
        group["lr"] = lr


class SchedulerState:
    """The scheduler as a checkpoint part: its position, with the learning rates put back on load."""

    def __init__(self, scheduler):
        self.scheduler = scheduler

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        restore_scheduler(self.scheduler, state)
