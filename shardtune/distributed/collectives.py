"""Small collectives shared by the loop and the evaluator."""

from __future__ import annotations

import torch
import torch.distributed as dist


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a handful of scalars across ranks in one all-reduce (float64: token counts stay exact)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()
