"""DistributedDataParallel: a full replica per rank, gradients all-reduced in buckets."""

from __future__ import annotations

import contextlib

import torch
from torch.nn.parallel import DistributedDataParallel

from shardtune.distributed.strategies.base import (
    StepOutcome,
    Strategy,
    TorchStateMixin,
    apply_compile,
    torch_clip_and_step,
)
from shardtune.optim import build_optimizer, build_scheduler


class DDPStrategy(TorchStateMixin, Strategy):
    name = "ddp"

    def setup(self, model: torch.nn.Module, total_steps: int) -> None:
        model.to(self.ctx.device)
        self._module = model
        apply_compile(model, self.cfg.train.compile)  # before the wrap: DDP's hooks stay eager
        device_ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
        # Gradients as views into the communication buckets: without it DDP keeps a second
        # full copy of every gradient (measured: 20 instead of 16 bytes per parameter).
        self.model = DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True)
        self.optimizer = build_optimizer(model, self.cfg.train, self.lr_scales)
        self.scheduler = build_scheduler(self.optimizer, self.cfg.train, total_steps)

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self._module

    def micro_step(self, is_last: bool):
        return contextlib.nullcontext() if is_last else self.model.no_sync()

    def autocast(self):
        if self.bf16:
            return torch.autocast(self.ctx.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, is_last: bool) -> None:
        loss.backward()

    def local_grads_finite(self) -> bool:
        # The clipping norm comes from this rank's replica; computed here once, before the
        # step's all-reduce carries the verdict, and reused by ``step``.
        grads = [p.grad for p in self._module.parameters() if p.grad is not None]
        self._norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        return bool(torch.isfinite(self._norm))

    def step(self, max_grad_norm: float | None, skip: bool) -> StepOutcome:
        norm, self._norm = getattr(self, "_norm", None), None
        return torch_clip_and_step(self, self._module.parameters(), max_grad_norm, skip, norm=norm)
