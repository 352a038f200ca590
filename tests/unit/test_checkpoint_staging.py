"""Asynchronous-save staging: one buffer reused by every save, a true copy, DTensor specs kept;
DDP's replicated state split into disjoint, balanced shares that together are the whole."""

from __future__ import annotations

import torch

from shardtune.checkpoint.staging import StagingBuffer, replica_share


def state(scale: float = 1.0) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "model": {"a.weight": torch.randn(64, 32, generator=g) * scale, "a.bias": torch.randn(32, generator=g)},
        "optim": {"state": {"a.weight": {"step": torch.tensor(3.0), "exp_avg": torch.randn(64, 32, generator=g)}}},
    }


def leaves(d: dict, prefix=()):
    for k, v in d.items():
        yield from leaves(v, (*prefix, k)) if isinstance(v, dict) else [((*prefix, k), v)]


def test_the_buffer_is_allocated_once_and_holds_a_copy():
    buffer = StagingBuffer()
    live = state()
    first = buffer.stage(live)
    pointers = {p: t.data_ptr() for p, t in leaves(first)}
    live["model"]["a.weight"].mul_(2)  # training goes on after the save returned
    assert torch.equal(first["model"]["a.weight"] * 2, live["model"]["a.weight"])
    second = buffer.stage(live)
    assert buffer.allocations == 1
    assert {p: t.data_ptr() for p, t in leaves(second)} == pointers
    for (path, got), (_, want) in zip(leaves(second), leaves(live), strict=True):
        assert torch.equal(got, want) and got.data_ptr() != want.data_ptr(), path
    assert buffer.nbytes == sum(t.numel() * t.element_size() for _, t in leaves(live))
    live["model"]["extra"] = torch.zeros(3)  # another layout: new buffers
    buffer.stage(live)
    assert buffer.allocations == 2


def test_a_dtensor_keeps_its_spec(single_process_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (1,))
    sharded = distribute_tensor(torch.randn(8, 4), mesh, [Shard(0)])
    staged = StagingBuffer().stage({"w": sharded})["w"]
    assert isinstance(staged, DTensor) and staged.placements == sharded.placements
    assert staged.shape == sharded.shape
    assert torch.equal(staged.to_local(), sharded.to_local())
    assert staged.to_local().data_ptr() != sharded.to_local().data_ptr()


def test_replica_shares_are_disjoint_balanced_and_complete():
    full = {f"layer{i}": torch.zeros(10 * (i + 1)) for i in range(9)} | {"note": "kept by all"}
    for world in (1, 2, 3, 4):
        shares = [replica_share(full, r, world) for r in range(world)]
        assert shares == [replica_share(full, r, world) for r in range(world)]  # deterministic
        owned = [{k for k, v in s.items() if isinstance(v, torch.Tensor)} for s in shares]
        assert set().union(*owned) == {k for k in full if k != "note"}
        assert sum(map(len, owned)) == 9  # each tensor in exactly one share
        assert all(s["note"] == "kept by all" for s in shares)
        loads = [sum(full[k].numel() for k in o) for o in owned]
        assert max(loads) - min(loads) <= 90  # greedy by size: within the largest tensor
