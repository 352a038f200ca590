"""One optimizer step, the same for every strategy, and the one all-reduce that makes ranks agree.

This rank takes its share of the global batch; all ranks first agree on the number of loss targets
(so the gradient is the global token mean whatever the rank/micro-batch split); each micro-batch runs
forward and backward; then one all-reduce carries the loss, the non-finite flags (loss, and gradients
where a rank clips with its own replica's norm) and any stop request, so every rank takes the same
skip/stop/save decision at the same step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shardtune.distributed.collectives import all_reduce_sum
from shardtune.distributed.watchdog import mark_progress
from shardtune.faults import FaultHooks


@dataclass(frozen=True)
class StepResult:
    loss: float  # global mean over loss targets (meaningless when not ``applied``)
    grad_norm: float
    applied: bool  # the optimizer updated the weights
    ranks_with_bad_loss: int
    ranks_with_bad_grads: int  # a rank's own gradient copy (a DDP replica) was non-finite
    stop_requested: bool  # some rank got a save-and-stop signal
    targets: float = 0.0  # positions that carried a loss, all ranks together

    @property
    def nonfinite(self) -> str | None:
        """What was non-finite, for the message every rank prints, or ``None``."""
        if self.applied:
            return None
        if self.ranks_with_bad_loss:
            return "loss"
        if self.ranks_with_bad_grads:
            return "gradients"
        return "gradient norm"  # reduced across ranks (FSDP2, ZeRO): every rank saw the same value

    @property
    def bad_ranks(self) -> int:
        return self.ranks_with_bad_loss or self.ranks_with_bad_grads


def train_step(step: int, micro_batches: list[dict], *, strategy, task, rank: int, world_size: int,
               max_grad_norm: float | None, stop_requested: bool, hooks: FaultHooks) -> StepResult:
    device = strategy.ctx.device
    local_targets = sum(task.count_targets(mb) for mb in micro_batches)
    global_targets = all_reduce_sum([float(local_targets)], device)[0]
    # Backward of (sum over this rank's targets) * world / global: DDP-style gradient averaging then
    # yields the global per-target mean on every strategy.
    scale = world_size / max(global_targets, 1.0)

    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for i, batch in enumerate(micro_batches):
        is_last = i == len(micro_batches) - 1
        with strategy.micro_step(is_last):
            with strategy.autocast():
                micro_loss = hooks.nonfinite_loss(task.loss_sum(strategy.model, batch, device), step, rank)
            strategy.backward(hooks.poison_backward(micro_loss, step, rank) * scale, is_last)
        loss_sum += micro_loss.detach().double()
    hooks.corrupt_gradient_replica(step, rank, strategy.model.parameters())

    bad_loss = 0.0 if torch.isfinite(loss_sum) else 1.0
    bad_grads = 0.0 if strategy.local_grads_finite() else 1.0
    hooks.maybe_stall(step, rank)
    mark_progress(rank, step)  # read only if a collective times out
    loss_total, bad_loss_ranks, stop_ranks, bad_grad_ranks = all_reduce_sum(
        [0.0 if bad_loss else float(loss_sum), bad_loss, float(stop_requested), bad_grads], device
    )
    outcome = strategy.step(max_grad_norm, skip=bad_loss_ranks > 0 or bad_grad_ranks > 0)
    return StepResult(
        loss=loss_total / max(global_targets, 1.0),
        grad_norm=outcome.grad_norm,
        applied=outcome.applied,
        ranks_with_bad_loss=int(bad_loss_ranks),
        ranks_with_bad_grads=int(bad_grad_ranks),
        stop_requested=stop_ranks > 0,
        targets=global_targets,
    )
