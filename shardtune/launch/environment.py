"""Where am I running? One answer for torchrun, SLURM, Open MPI, PMIx and a lone process.

Every launcher and the process-group setup read rank, world size, local rank, node rank
and the rendezvous address from here, never from the environment directly.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class ProcessEnvironment:
    kind: str  # torchrun | slurm | openmpi | pmix | single
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    master_addr: str
    master_port: int


def _int(env: Mapping[str, str], *names: str, default: int | None = None) -> int:
    for name in names:
        value = env.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError:
                raise ValueError(f"environment variable {name}={value!r} is not an integer") from None
    if default is None:
        raise KeyError(f"none of {', '.join(names)} is set")
    return default


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list such as ``node[03-05,09],gpu1`` -> ``node03``."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
    prefix, ranges = match.groups()
    if not ranges:
        return prefix
    return prefix + ranges.split(",", 1)[0].split("-", 1)[0]


def detect_environment(env: Mapping[str, str] | None = None) -> ProcessEnvironment:
    env = os.environ if env is None else env
    port = _int(env, "MASTER_PORT", default=DEFAULT_PORT)

    if "TORCHELASTIC_RUN_ID" in env or ("RANK" in env and "WORLD_SIZE" in env and "LOCAL_RANK" in env):
        local_world = _int(env, "LOCAL_WORLD_SIZE", default=1)
        return ProcessEnvironment(
            kind="torchrun",
            rank=_int(env, "RANK"),
            world_size=_int(env, "WORLD_SIZE"),
            local_rank=_int(env, "LOCAL_RANK"),
            local_world_size=local_world,
            node_rank=_int(env, "GROUP_RANK", "NODE_RANK", default=_int(env, "RANK") // max(1, local_world)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=port,
        )

    if "OMPI_COMM_WORLD_RANK" in env:
        local_world = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", default=1)
        rank = _int(env, "OMPI_COMM_WORLD_RANK")
        return ProcessEnvironment(
            kind="openmpi",
            rank=rank,
            world_size=_int(env, "OMPI_COMM_WORLD_SIZE"),
            local_rank=_int(env, "OMPI_COMM_WORLD_LOCAL_RANK", default=0),
            local_world_size=local_world,
            node_rank=_int(env, "OMPI_COMM_WORLD_NODE_RANK", default=rank // max(1, local_world)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=port,
        )

    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return ProcessEnvironment(
            kind="slurm",
            rank=_int(env, "SLURM_PROCID"),
            world_size=_int(env, "SLURM_NTASKS"),
            local_rank=_int(env, "SLURM_LOCALID", default=0),
            local_world_size=_int(env, "SLURM_NTASKS_PER_NODE", default=1),
            node_rank=_int(env, "SLURM_NODEID", default=0),
            master_addr=env.get("MASTER_ADDR") or first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")),
            master_port=port,
        )

    if "PMIX_RANK" in env or "PMI_RANK" in env:
        local_world = _int(env, "MPI_LOCALNRANKS", "PMI_LOCAL_SIZE", default=1)
        rank = _int(env, "PMIX_RANK", "PMI_RANK")
        return ProcessEnvironment(
            kind="pmix",
            rank=rank,
            world_size=_int(env, "PMI_SIZE", "PMIX_SIZE"),
            local_rank=_int(env, "MPI_LOCALRANKID", "PMI_LOCAL_RANK", default=0),
            local_world_size=local_world,
            node_rank=rank // max(1, local_world),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=port,
        )

    return ProcessEnvironment(
        kind="single", rank=0, world_size=1, local_rank=0, local_world_size=1, node_rank=0,
        master_addr=env.get("MASTER_ADDR", "127.0.0.1"), master_port=port,
    )
