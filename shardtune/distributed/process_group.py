"""Process-group lifecycle: backend, timeouts, threads per rank, per-rank seeds, clean exit."""

from __future__ import annotations

import os
import random
import socket
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from shardtune.distributed.environment import ProcessEnvironment, detect_environment


@dataclass(frozen=True)
class DistContext:
    env: ProcessEnvironment
    device: torch.device
    backend: str

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def is_main(self) -> bool:
        return self.env.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _threads_per_rank(env: ProcessEnvironment) -> int:
    # Ranks x threads above the core count thrashes: 2 ranks x 2 threads on 2 cores measured
    # 2.6x slower than 2 x 1. An explicit OMP_NUM_THREADS from the user wins.
    if "OMP_NUM_THREADS" in os.environ:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // max(1, env.local_world_size))


def init_distributed(init_timeout_s: float, collective_timeout_s: float,
                     rendezvous_interface: str | None = None) -> DistContext:
    """Join (or, for a lone process, create) the default process group.

    Init gets a long timeout because the first rank may wait for slow nodes to start; every
    later collective gets ``collective_timeout_s`` so a stalled rank becomes an error, not a hang.
    ``rendezvous_interface``: under an MPI launcher without MASTER_ADDR, rank 0's interface to offer.
    """
    env = detect_environment()
    if env.rendezvous == "mpi":
        # Imported here only: a single-process or torchrun run never needs mpi4py.
        from shardtune.distributed.mpi_rendezvous import REACH_TIMEOUT_S, mpi_rendezvous

        env = mpi_rendezvous(env, rendezvous_interface, min(init_timeout_s, REACH_TIMEOUT_S))
        os.environ.update(MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port))
    if env.world_size == 1 and "MASTER_ADDR" not in os.environ:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    os.environ.setdefault("MASTER_ADDR", env.master_addr)
    os.environ.setdefault("MASTER_PORT", str(env.master_port))
    os.environ.update(
        RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank)
    )

    if torch.cuda.is_available():
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
        torch.set_num_threads(_threads_per_rank(env))

    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            rank=env.rank,
            world_size=env.world_size,
            timeout=timedelta(seconds=init_timeout_s),
            device_id=device if backend == "nccl" else None,
        )
        # A barrier under the long timeout proves everyone arrived; then tighten it.
        dist.barrier()
        _set_default_timeout(timedelta(seconds=collective_timeout_s))
    return DistContext(env=env, device=device, backend=backend)


def _set_default_timeout(timeout: timedelta) -> None:
    from torch.distributed.distributed_c10d import _get_default_group, _set_pg_timeout

    _set_pg_timeout(timeout, _get_default_group())


def seed_everything(seed: int, rank: int) -> None:
    """Same seed for model init on all ranks; per-rank offset for anything rank-local (dropout)."""
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed + rank)


def shutdown(clean: bool = True) -> None:
    # Destroying the group before interpreter exit avoids gloo's sporadic
    # "terminate called without an active exception" abort during teardown. After a failure
    # the peers may be gone: a final barrier would only wait out another timeout.
    if dist.is_initialized():
        try:
            if clean:
                dist.barrier()
        finally:
            dist.destroy_process_group()
