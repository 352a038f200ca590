"""Staging for asynchronous checkpoints: the loop waits for one memory copy, never for the disk.

``StagingBuffer`` keeps one CPU copy of this rank's checkpoint tensors (pinned when the
tensors live on a GPU), allocated at the first asynchronous save and reused by every later
one, so a save costs the loop a copy into memory that is already mapped. Allocating a fresh
copy per save, as ``dcp.async_save`` does by default, costs page faults for the whole state
on every save (measured: 4.8 s for a 1 GiB DDP state on 2 CPU ranks, more than the 3.7 s of
a synchronous save). The background thread then writes the copy while training continues.

``replica_share``: under DDP every rank holds the same tensors. Each rank stages and writes
only its share (whole tensors, balanced by bytes), so the ranks together write one replica.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch without DTensor
    DTensor = ()  # type: ignore[assignment]


def _leaves(state: dict, prefix: tuple = ()) -> Iterator[tuple[tuple, object]]:
    for key, value in state.items():
        if isinstance(value, dict):
            yield from _leaves(value, (*prefix, key))
        else:
            yield (*prefix, key), value


def _rebuild(state: dict, replace: dict[tuple, object], prefix: tuple = ()) -> dict:
    out = {}
    for key, value in state.items():
        path = (*prefix, key)
        if isinstance(value, dict):
            out[key] = _rebuild(value, replace, path)
        else:
            out[key] = replace.get(path, value)
    return out


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _signature(tensor: torch.Tensor) -> tuple:
    local = _local(tensor)
    placements = tuple(map(str, tensor.placements)) if isinstance(tensor, DTensor) else None
    return tuple(tensor.shape), tuple(local.shape), local.dtype, placements


def _allocate(tensor: torch.Tensor, pin: bool) -> torch.Tensor:
    local = _local(tensor).detach()
    buffer = torch.empty(local.shape, dtype=local.dtype, device="cpu", pin_memory=pin)
    if not isinstance(tensor, DTensor):
        return buffer
    # A DTensor with the same spec (global shape, placements, mesh) around the CPU buffer:
    # DCP's planner reads the shard's offsets from the spec and its bytes from the buffer.
    # ``from_local`` would move the buffer back to the mesh's device, so build it directly.
    return DTensor(buffer, tensor._spec, requires_grad=False)


def _buffer_of(staged: torch.Tensor) -> torch.Tensor:
    return staged._local_tensor if isinstance(staged, DTensor) else staged


class StagingBuffer:
    """One reusable CPU copy of a checkpoint state (nested dicts of tensors)."""

    def __init__(self, pin_memory: bool = False):
        self.pin_memory = pin_memory
        self.allocations = 0  # how often buffers were (re)allocated: once per run normally
        self._signature: tuple | None = None
        self._staged: dict[tuple, torch.Tensor] = {}

    @property
    def nbytes(self) -> int:
        return sum(_buffer_of(t).numel() * _buffer_of(t).element_size() for t in self._staged.values())

    def stage(self, state: dict) -> dict:
        """A copy of ``state`` in the buffers; valid until the next ``stage``."""
        tensors = [(p, v) for p, v in _leaves(state) if isinstance(v, torch.Tensor)]
        signature = tuple((p, _signature(v)) for p, v in tensors)
        if signature != self._signature:  # first save, or the state's layout changed
            self._staged = {p: _allocate(v, self.pin_memory) for p, v in tensors}
            self._signature = signature
            self.allocations += 1
        for path, value in tensors:
            _buffer_of(self._staged[path]).copy_(_local(value).detach(), non_blocking=self.pin_memory)
        if self.pin_memory:
            torch.cuda.synchronize()  # the copies must land before the writer reads them
        return _rebuild(state, self._staged)

    def release(self) -> None:
        self._staged, self._signature = {}, None


def replica_share(state: dict, rank: int, world_size: int) -> dict:
    """This rank's share of a state every rank holds identically: whole tensors, balanced by
    bytes, the same assignment on every rank (largest first, each to the least-loaded rank)."""
    if world_size == 1:
        return state
    tensors = [(p, v) for p, v in _leaves(state) if isinstance(v, torch.Tensor)]
    order = sorted(range(len(tensors)), key=lambda i: (-tensors[i][1].numel() * tensors[i][1].element_size(), i))
    load = [0] * world_size
    mine: set[tuple] = set()
    for i in order:
        path, tensor = tensors[i]
        owner = min(range(world_size), key=lambda r: (load[r], r))
        load[owner] += tensor.numel() * tensor.element_size()
        if owner == rank:
            mine.add(path)
    return _prune(state, mine, ())


def _prune(state: dict, keep: set[tuple], prefix: tuple) -> dict:
    out = {}
    for key, value in state.items():
        path = (*prefix, key)
        if isinstance(value, dict):
            pruned = _prune(value, keep, path)
            if pruned:
                out[key] = pruned
        elif not isinstance(value, torch.Tensor) or path in keep:
            out[key] = value
    return out
