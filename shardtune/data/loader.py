"""The data cursor: one global sample order, each rank taking its slice of every step.

Every optimizer step consumes ``global_batch_size`` consecutive sequences of the epoch's
packed order. Rank ``r`` of ``W`` takes the ``r``-th contiguous ``global/W`` block and splits
it into micro-batches. The cursor (epoch, sequences consumed) is all the resume state there
is, so a run resumed on a different world size continues with exactly the sequences an
uninterrupted run would have used.

With ``num_workers > 0`` background threads (``prefetch``) build the next
``prefetch_steps`` steps ahead. They plan from their own copy of the cursor; the loader's
cursor, the one checkpointed, advances only when the loop takes a step, so a checkpoint
never counts a step that was prefetched but not trained on.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from shardtune.data.prefetch import OrderedPrefetcher
from shardtune.errors import ConfigError


class SequenceSource(Protocol):
    """Anything that can pack an epoch: the in-memory corpus or prepared, memory-mapped shards."""

    def epoch(self, epoch: int) -> EpochSequences: ...


class EpochSequences(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, k: int) -> dict[str, np.ndarray]: ...


def collate(samples: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    return {key: torch.from_numpy(np.stack([s[key] for s in samples])) for key in samples[0]}


@dataclass(frozen=True)
class StepPlan:
    """One optimizer step: sequences ``[start, start + global_batch_size)`` of ``epoch``."""

    epoch: int
    start: int

    def __str__(self) -> str:
        return f"the step at epoch {self.epoch}, sequence {self.start}"


# Epochs kept packed at once: the current one, and the next one prefetch workers may reach.
_EPOCH_CACHE = 2


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
        num_workers: int = 0,
        prefetch_steps: int = 2,
    ):
        per_rank, rem = divmod(global_batch_size, world_size)
        if rem or per_rank % micro_batch_size:
            raise ConfigError(
                f"train.global_batch_size={global_batch_size} must split into {world_size} ranks "
                f"x whole micro-batches of train.micro_batch_size={micro_batch_size}"
            )
        if num_workers < 0 or prefetch_steps < 1:
            raise ValueError(
                f"data.num_workers={num_workers} must be >= 0 and data.prefetch_steps={prefetch_steps} >= 1"
            )
        self.source = source
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.per_rank = per_rank
        self.rank = rank
        self.world_size = world_size
        self.max_epochs = max_epochs
        self.num_workers = num_workers
        self.prefetch_steps = prefetch_steps
        self.epoch_index = 0
        self.consumed = 0  # sequences of the current epoch already handed out (all ranks)
        self._epochs: dict[int, EpochSequences] = {}
        self._epochs_lock = threading.Lock()
        self._prefetcher: OrderedPrefetcher | None = None

    @property
    def grad_accum_steps(self) -> int:
        return self.per_rank // self.micro_batch_size

    def _sequences(self, epoch: int) -> EpochSequences:
        with self._epochs_lock:  # the loop and the prefetch workers share the cache
            seqs = self._epochs.get(epoch)
            if seqs is None:
                seqs = self.source.epoch(epoch)
                self._epochs[epoch] = seqs
                while len(self._epochs) > _EPOCH_CACHE:
                    del self._epochs[min(self._epochs)]
            return seqs

    def steps_per_epoch(self) -> int:
        return len(self._sequences(self.epoch_index)) // self.global_batch_size

    def _exhausted(self, epoch: int, consumed: int) -> bool:
        if self.max_epochs is None:
            return False
        return epoch + consumed / max(1, len(self._sequences(epoch))) >= self.max_epochs

    def exhausted(self) -> bool:
        return self._exhausted(self.epoch_index, self.consumed)

    def plan(self, epoch: int, consumed: int) -> StepPlan | None:
        """The step that follows cursor (epoch, consumed), or None at the end of the data."""
        if self._exhausted(epoch, consumed):
            return None
        if consumed + self.global_batch_size > len(self._sequences(epoch)):
            # The remainder of an epoch depends only on the global batch size, so dropping
            # it keeps the order identical at every world size.
            epoch, consumed = epoch + 1, 0
            if self._exhausted(epoch, consumed):
                return None
            available = len(self._sequences(epoch))
            if self.global_batch_size > available:
                raise ValueError(
                    f"an epoch has only {available} sequences, fewer than "
                    f"train.global_batch_size={self.global_batch_size}"
                )
        return StepPlan(epoch, consumed)

    def build(self, step: StepPlan) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches of ``step``."""
        seqs = self._sequences(step.epoch)
        start = step.start + self.rank * self.per_rank
        mine = [seqs[i] for i in range(start, start + self.per_rank)]
        mb = self.micro_batch_size
        return [collate(mine[i : i + mb]) for i in range(0, len(mine), mb)]

    def next_step(self) -> list[dict[str, torch.Tensor]] | None:
        """This rank's micro-batches for the next optimizer step, or None at the end."""
        if self.num_workers == 0:
            step = self.plan(self.epoch_index, self.consumed)
            if step is None:
                return None
            batches = self.build(step)
        else:
            if self._prefetcher is None:
                self._prefetcher = self._start_prefetch()
            item = self._prefetcher.get()
            if item is None:
                return None
            step, batches = item
        self.epoch_index, self.consumed = step.epoch, step.start + self.global_batch_size
        return batches

    def _start_prefetch(self) -> OrderedPrefetcher:
        cursor = [self.epoch_index, self.consumed]  # the workers' own cursor, ahead of the loop's

        def next_job() -> StepPlan | None:
            step = self.plan(*cursor)
            if step is not None:
                cursor[:] = [step.epoch, step.start + self.global_batch_size]
            return step

        return OrderedPrefetcher(next_job, self.build, workers=self.num_workers, depth=self.prefetch_steps,
                                 name=f"shardtune-data-r{self.rank}")

    def close(self) -> None:
        """Stop the prefetch workers (idempotent); a later ``next_step`` starts new ones."""
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None

    def __enter__(self) -> GlobalBatchLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch_index, "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        # Steps prefetched from the old cursor are not the ones that follow the new one.
        self.close()
        self.epoch_index = int(state["epoch"])
        self.consumed = int(state["consumed"])
