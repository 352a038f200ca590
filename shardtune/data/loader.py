"""The data cursor: one global sample order, each rank taking its slice of every step.

Every optimizer step consumes ``global_batch_size`` consecutive sequences of the epoch's
packed order. Rank ``r`` of ``W`` takes the ``r``-th contiguous ``global/W`` block and splits
it into micro-batches. The cursor (epoch, sequences consumed) is all the resume state there
is, so a run resumed on a different world size continues with exactly the sequences an
uninterrupted run would have used.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch


class SequenceSource(Protocol):
    """Anything that can pack an epoch: the in-memory corpus or prepared, memory-mapped shards."""

    def epoch(self, epoch: int) -> EpochSequences: ...


class EpochSequences(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, k: int) -> dict[str, np.ndarray]: ...


def collate(samples: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    return {key: torch.from_numpy(np.stack([s[key] for s in samples])) for key in samples[0]}


class GlobalBatchLoader:
    def __init__(
        self,
        source: SequenceSource,
        *,
        global_batch_size: int,
        micro_batch_size: int,
        rank: int,
        world_size: int,
        max_epochs: float | None = None,
    ):
        per_rank, rem = divmod(global_batch_size, world_size)
        if rem or per_rank % micro_batch_size:
            raise ValueError(
                f"train.global_batch_size={global_batch_size} must split into {world_size} ranks "
                f"x whole micro-batches of train.micro_batch_size={micro_batch_size}"
            )
        self.source = source
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.per_rank = per_rank
        self.rank = rank
        self.world_size = world_size
        self.max_epochs = max_epochs
        self.epoch_index = 0
        self.consumed = 0  # sequences of the current epoch already handed out (all ranks)
        self._epoch_cache: tuple[int, EpochSequences] | None = None

    @property
    def grad_accum_steps(self) -> int:
        return self.per_rank // self.micro_batch_size

    def _sequences(self, epoch: int) -> EpochSequences:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            self._epoch_cache = (epoch, self.source.epoch(epoch))
        return self._epoch_cache[1]

    def steps_per_epoch(self) -> int:
        return len(self._sequences(self.epoch_index)) // self.global_batch_size

    def exhausted(self) -> bool:
        if self.max_epochs is None:
            return False
        progress = self.epoch_index + self.consumed / max(1, len(self._sequences(self.epoch_index)))
        return progress >= self.max_epochs

    def next_step(self) -> list[dict[str, torch.Tensor]] | None:
        """This rank's micro-batches for the next optimizer step, or None at the end."""
        if self.exhausted():
            return None
        seqs = self._sequences(self.epoch_index)
        if self.consumed + self.global_batch_size > len(seqs):
            # The remainder of an epoch depends only on the global batch size, so dropping
            # it keeps the order identical at every world size.
            self.epoch_index += 1
            self.consumed = 0
            if self.exhausted():
                return None
            seqs = self._sequences(self.epoch_index)
            if self.global_batch_size > len(seqs):
                raise ValueError(
                    f"an epoch has only {len(seqs)} sequences, fewer than "
                    f"train.global_batch_size={self.global_batch_size}"
                )
        start = self.consumed + self.rank * self.per_rank
        mine = [seqs[i] for i in range(start, start + self.per_rank)]
        self.consumed += self.global_batch_size
        mb = self.micro_batch_size
        return [collate(mine[i : i + mb]) for i in range(0, len(mine), mb)]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch_index, "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch_index = int(state["epoch"])
        self.consumed = int(state["consumed"])
