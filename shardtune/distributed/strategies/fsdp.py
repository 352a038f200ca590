"""FSDP2: ``fully_shard`` on every transformer block, then on the root module.

Blocks are found through the model's own ``_no_split_modules`` (the classes Hugging Face
marks as indivisible), so no model code needs to know it is being sharded.
"""

from __future__ import annotations

import torch
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from shardtune.distributed.strategies.base import StepOutcome, Strategy, TorchStateMixin, torch_clip_and_step
from shardtune.train.optim import build_optimizer, build_scheduler


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    block_names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in block_names]
    if not blocks:
        raise ValueError(
            f"cannot find transformer blocks in {type(model).__name__}: it declares no "
            "_no_split_modules; FSDP2 would shard it as one unit"
        )
    return blocks


class FSDPStrategy(TorchStateMixin, Strategy):
    name = "fsdp"

    def setup(self, model: torch.nn.Module, total_steps: int) -> None:
        model.to(self.ctx.device)
        policy = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16 if self.bf16 else None,
            reduce_dtype=torch.float32 if self.bf16 else None,
        )
        reshard = self.cfg.distributed.fsdp.reshard_after_forward
        blocks = transformer_blocks(model)
        for i, block in enumerate(blocks):
            # The last block's parameters are needed again at once by backward: keep them.
            fully_shard(block, mp_policy=policy, reshard_after_forward=reshard and i < len(blocks) - 1)
        fully_shard(model, mp_policy=policy, reshard_after_forward=reshard)
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
