"""FSDP2: ``fully_shard`` on every transformer block, then on the root module.

Blocks are found through the model's own ``_no_split_modules`` (the classes Hugging Face
marks as indivisible), so no model code needs to know it is being sharded. Order, as in
torchtitan: activation checkpointing (``build_model``), per-block ``torch.compile``, then
``fully_shard``, then the explicit prefetch schedule.
"""

from __future__ import annotations

import torch
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from shardtune.distributed.strategies.base import (
    StepOutcome,
    Strategy,
    TorchStateMixin,
    apply_compile,
    torch_clip_and_step,
    transformer_blocks,
)
from shardtune.models.sharded_load import peak_host_memory_mib
from shardtune.optim import build_optimizer, build_scheduler

__all__ = ["FSDPStrategy", "mixed_precision_policy", "set_prefetch", "transformer_blocks"]


def mixed_precision_policy(bf16: bool, reduce_dtype: str) -> MixedPrecisionPolicy:
    reduce = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(reduce_dtype)
    if reduce_dtype == "auto":
        reduce = torch.float32 if bf16 else None  # None: reduce in the parameters' dtype
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=reduce)


def set_prefetch(blocks: list, forward: int, backward: int) -> None:
    """Issue the all-gathers of the next ``forward`` blocks (and, in backward, of the
    ``backward`` blocks before this one) as soon as a block starts, so communication for
    several blocks is in flight while one computes. Costs that many blocks of unsharded
    memory; worth it when all-gathers are latency-bound (many ranks, small blocks)."""
    for i, block in enumerate(blocks):
        if forward:
            block.set_modules_to_forward_prefetch(blocks[i + 1 : i + 1 + forward])
        if backward:
            # Backward visits blocks last to first: block i is followed by i-1, i-2, ...
            block.set_modules_to_backward_prefetch(blocks[max(0, i - backward) : i][::-1])


def local_flat_view(name: str, tensor: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Where this rank's part of a (DTensor) parameter starts in the flattened full tensor.

    FSDP2 shards dim 0 only (``Shard(0)``, ``torch.chunk`` sizes), so a rank's rows are one
    contiguous range of elements; buffers are replicated and read whole.
    """
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not isinstance(tensor, DTensor):
        return 0, tensor.data
    local = tensor.to_local()
    _, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    row = local[0].numel() if local.dim() else 1
    return offset[0] * row if local.dim() else 0, local


class FSDPStrategy(TorchStateMixin, Strategy):
    name = "fsdp"

    def build_model(self, tokenizer, label_names: list[str] | None = None) -> torch.nn.Module:
        # On meta: ``fully_shard`` runs before any weight exists, then each rank allocates
        # and reads only its shards (torchtitan's order).
        return self.build_meta_model(tokenizer, label_names)

    def setup(self, model: torch.nn.Module, total_steps: int) -> None:
        meta = self.weights is not None
        if not meta:
            model.to(self.ctx.device)
        fsdp = self.cfg.distributed.fsdp
        policy = mixed_precision_policy(self.bf16, fsdp.reduce_dtype)
        blocks = transformer_blocks(model)
        apply_compile(model, self.cfg.train.compile)
        for i, block in enumerate(blocks):
            # The last block's parameters are needed again at once by backward: keep them.
            fully_shard(block, mp_policy=policy,
                        reshard_after_forward=fsdp.reshard_after_forward and i < len(blocks) - 1)
        fully_shard(model, mp_policy=policy, reshard_after_forward=fsdp.reshard_after_forward)
        if meta:
            model.to_empty(device=self.ctx.device)
            self.weights.load_into(model, local_flat_view)
            self.load_peak_host_mib = peak_host_memory_mib()
            self.weights = None  # drops the checkpoint handles and the init records
        set_prefetch(blocks, fsdp.forward_prefetch, fsdp.backward_prefetch)
        self.model = model
        self.optimizer = build_optimizer(model, self.cfg.train, self.lr_scales)
        self.scheduler = build_scheduler(self.optimizer, self.cfg.train, total_steps)

    def micro_step(self, is_last: bool):
        # Reduce-scatter once per optimizer step instead of once per micro-batch.
        self.model.set_requires_gradient_sync(is_last)
        return super().micro_step(is_last)

    def backward(self, loss: torch.Tensor, is_last: bool) -> None:
        loss.backward()

    def step(self, max_grad_norm: float | None, skip: bool) -> StepOutcome:
        return torch_clip_and_step(self, self.model.parameters(), max_grad_norm, skip)
