"""Evaluation on a split: every rank runs its share, sums are all-reduced, metrics computed.

Every rank runs the same number of forward passes even when the split does not divide
evenly: sharded strategies (FSDP2, ZeRO-3) all-gather parameters inside forward, so a rank
that stopped early would leave the others waiting forever. Ranks that run out repeat a row
and give it zero weight. Evaluation leaves the RNG streams and the training data cursor
untouched: it reads its own split and restores every generator it could have consumed.
"""

from __future__ import annotations

import contextlib
import math
import random

import numpy as np
import torch
import torch.distributed as dist

from shardtune import faults
from shardtune.data.loader import collate
from shardtune.eval.metrics import classification_metrics, language_model_metrics


@contextlib.contextmanager
def preserved_rng():
    state = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
             torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    try:
        yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.set_rng_state(state[2])
        if state[3] is not None:
            torch.cuda.set_rng_state_all(state[3])


def eval_batches(total: int, micro_batch_size: int, world_size: int) -> int:
    """Forward passes per rank: the same on every rank (the largest share decides)."""
    return math.ceil(math.ceil(total / world_size) / micro_batch_size)


@torch.no_grad()
def evaluate(
    runner, task, sequences, *, micro_batch_size: int, rank: int, world_size: int,
    max_batches: int | None = None, label_names: list[str] | None = None,
) -> dict:
    """Metrics of ``runner.model`` on ``sequences`` (identical dict on every rank).

    ``runner`` is a strategy (or anything with ``model``, ``ctx.device``, ``train(mode)`` and
    ``autocast()``). Classification results also carry ``confusion`` (a nested list).
    """
    device = runner.ctx.device
    total = len(sequences)
    if max_batches is not None:
        total = min(total, max_batches * micro_batch_size * world_size)
    mine = list(range(rank, total, world_size))
    batches = eval_batches(total, micro_batch_size, world_size)
    was_training = runner.model.training
    sums: dict[str, torch.Tensor] = {}
    with preserved_rng():
        runner.train(False)
        try:
            for b in range(batches):
                chunk = mine[b * micro_batch_size : (b + 1) * micro_batch_size]
                weight = 1.0 if chunk else 0.0
                batch = collate([sequences[i] for i in (chunk or [0])])
                with runner.autocast():
                    logits = task.logits(runner.model, batch, device)
                for key, value in task.eval_stats(logits, batch, device).items():
                    sums[key] = sums[key] + value * weight if key in sums else value * weight
                if b == 0:
                    faults.hooks().signal_point("eval", rank)
        finally:
            runner.train(was_training)
    keys = sorted(sums)
    flat = torch.cat([sums[k].reshape(-1).double() for k in keys])
    dist.all_reduce(flat)
    reduced, offset = {}, 0
    for k in keys:
        size = sums[k].numel()
        reduced[k] = flat[offset : offset + size].reshape(sums[k].shape).cpu()
        offset += size
    if hasattr(task, "metrics_from_sums"):  # a task with metrics of its own (preference)
        return task.metrics_from_sums(reduced)
    loss_sum, targets = float(reduced["loss_sum"]), float(reduced["targets"])
    if "confusion" in reduced:
        n = task.num_labels
        confusion = reduced["confusion"].reshape(n, n).round().long().numpy()
        loss = loss_sum / targets if targets > 0 else math.nan
        metrics = {"loss": loss, **classification_metrics(confusion, label_names)}
        metrics["confusion"] = confusion.tolist()
        return metrics
    return language_model_metrics(loss_sum, targets, float(reduced["correct"]))


def scalars(metrics: dict) -> dict[str, float]:
    """The scalar part of a metrics dict (what TensorBoard gets)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
