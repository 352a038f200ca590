"""Validation loss computed by every rank on its share, reduced to a global token mean.

Every rank runs the same number of forward passes even when the validation set does not
divide evenly: sharded strategies (FSDP2, ZeRO-3) all-gather parameters inside forward,
so a rank that stopped early would leave the others waiting forever. Ranks that run out
repeat a sequence and give it zero weight.
"""

from __future__ import annotations

import math

import torch

from shardtune.data.loader import EpochSequences, collate
from shardtune.train.loss import count_loss_tokens, token_loss_sum
from shardtune.train.metrics import all_reduce_sum


@torch.no_grad()
def evaluate_loss(
    strategy,
    sequences: EpochSequences,
    *,
    micro_batch_size: int,
    rank: int,
    world_size: int,
    max_batches: int | None = None,
) -> dict[str, float]:
    total = len(sequences)
    if max_batches is not None:
        total = min(total, max_batches * micro_batch_size * world_size)
    mine = list(range(rank, total, world_size))
    batches = math.ceil(math.ceil(total / world_size) / micro_batch_size)
    was_training = strategy.model.training
    strategy.train(False)
    loss_sum = torch.zeros((), dtype=torch.float64, device=strategy.ctx.device)
    tokens = 0
    for b in range(batches):
        chunk = mine[b * micro_batch_size : (b + 1) * micro_batch_size]
        weight = 1.0 if chunk else 0.0
        batch = collate([sequences[i] for i in (chunk or [0])])
        with strategy.autocast():
            loss = token_loss_sum(strategy.model, batch, strategy.ctx.device)
        loss_sum += loss.double() * weight
        tokens += count_loss_tokens(batch) if chunk else 0
    strategy.train(was_training)
    global_loss, global_tokens = all_reduce_sum([float(loss_sum), float(tokens)], strategy.ctx.device)
    mean = global_loss / max(global_tokens, 1.0)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "tokens": global_tokens}
