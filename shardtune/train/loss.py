"""Token-summed next-token loss: the loop divides by the step's global token count itself."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shardtune.data.packing import IGNORE_INDEX


def count_loss_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def token_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    """Sum over loss tokens of the cross-entropy of predicting token t+1 from tokens <= t."""
    input_ids = batch["input_ids"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    position_ids = batch["position_ids"].to(device, non_blocking=True)
    # No attention_mask: the per-document position_ids are what make the mask block-diagonal.
    logits = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(),
        labels[:, 1:].flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
