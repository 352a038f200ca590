"""Where am I running? One answer for torchrun, SLURM, Open MPI, PMIx and a lone process.

Every launcher and the process-group setup read rank, world size, local rank, node rank
and the rendezvous address from here, never from the environment directly.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace

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
    # "env": the fields above are final. "mpi": an MPI launcher left out the address (or the
    # local ranks); distributed/mpi_rendezvous.py finds them with mpi4py before the group starts.
    rendezvous: str = "env"


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


def slurm_tasks_on_node(tasks_per_node: str, node_id: int) -> int:
    """Tasks on node ``node_id`` from SLURM_TASKS_PER_NODE, e.g. ``2(x3),1`` -> 2, 2, 2, 1."""
    counts: list[int] = []
    for part in tasks_per_node.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not match:
            raise ValueError(f"cannot parse SLURM_TASKS_PER_NODE={tasks_per_node!r}")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    if not 0 <= node_id < len(counts):
        raise ValueError(f"SLURM_NODEID={node_id} is outside SLURM_TASKS_PER_NODE={tasks_per_node!r}")
    return counts[node_id]


def _mpi_master_addr(env: Mapping[str, str], local_size_var: str, world_size: int) -> str | None:
    """MPI launchers pass no rendezvous address: the user's, one that is safe to derive, or None
    (the MPI rendezvous picks one).

    Not the first address of ``hostname -I`` (DeepSpeed's guess): on multi-homed nodes that is
    often an interface the other nodes cannot reach. Where the launcher does not say how many
    ranks share this node, the communicator has to tell (None).
    """
    if env.get("MASTER_ADDR"):
        return env["MASTER_ADDR"]
    if local_size_var not in env:
        return None
    if _int(env, local_size_var) >= world_size:
        return "127.0.0.1"  # every rank is on this machine
    if env.get("SLURM_JOB_NODELIST"):
        # mpirun inside a SLURM allocation places rank 0 on the allocation's first node.
        return first_slurm_host(env["SLURM_JOB_NODELIST"])
    return None


def _rendezvous(env: Mapping[str, str], found: ProcessEnvironment, complete: bool) -> ProcessEnvironment:
    """``found`` as is, or marked for the mpi4py rendezvous: when an MPI launcher left something
    out, or when SHARDTUNE_RENDEZVOUS=mpi asks for it (``shardtune slurm submit --launcher mpi``)."""
    if complete and env.get("SHARDTUNE_RENDEZVOUS", "env") != "mpi":
        return found
    return replace(found, rendezvous="mpi")


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
        world_size = _int(env, "OMPI_COMM_WORLD_SIZE")
        addr = _mpi_master_addr(env, "OMPI_COMM_WORLD_LOCAL_SIZE", world_size)
        return _rendezvous(env, ProcessEnvironment(
            kind="openmpi",
            rank=rank,
            world_size=world_size,
            local_rank=_int(env, "OMPI_COMM_WORLD_LOCAL_RANK", default=0),
            local_world_size=local_world,
            node_rank=_int(env, "OMPI_COMM_WORLD_NODE_RANK", default=rank // max(1, local_world)),
            master_addr=addr or "",
            master_port=port,
        ), complete=addr is not None and "OMPI_COMM_WORLD_LOCAL_RANK" in env)

    # Under srun, Open MPI's variables are absent (OMPI_COMM_WORLD_RANK is unset even with
    # --mpi=pmix): SLURM's own describe the rank. The batch script itself also carries
    # SLURM_PROCID=0 and the job's SLURM_NTASKS but is one process: it has a job id and no step id.
    in_batch_script = "SLURM_JOB_ID" in env and not ("SLURM_STEP_ID" in env or "SLURM_STEPID" in env)
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and not in_batch_script:
        node_rank = _int(env, "SLURM_NODEID", default=0)
        if env.get("SLURM_TASKS_PER_NODE"):
            local_world = slurm_tasks_on_node(env["SLURM_TASKS_PER_NODE"], node_rank)
        else:
            local_world = _int(env, "SLURM_NTASKS_PER_NODE", default=1)
        return _rendezvous(env, ProcessEnvironment(
            kind="slurm",
            rank=_int(env, "SLURM_PROCID"),
            world_size=_int(env, "SLURM_NTASKS"),
            local_rank=_int(env, "SLURM_LOCALID", default=0),
            local_world_size=local_world,
            node_rank=node_rank,
            master_addr=env.get("MASTER_ADDR") or first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")),
            master_port=port,
        ), complete=True)

    if "PMIX_RANK" in env or "PMI_RANK" in env:
        local_size_var = "MPI_LOCALNRANKS" if "MPI_LOCALNRANKS" in env else "PMI_LOCAL_SIZE"
        local_world = _int(env, local_size_var, default=1)
        rank = _int(env, "PMIX_RANK", "PMI_RANK")
        world_size = _int(env, "PMI_SIZE", "PMIX_SIZE")
        addr = _mpi_master_addr(env, local_size_var, world_size)
        local_known = local_size_var in env and ("MPI_LOCALRANKID" in env or "PMI_LOCAL_RANK" in env)
        return _rendezvous(env, ProcessEnvironment(
            kind="pmix",
            rank=rank,
            world_size=world_size,
            local_rank=_int(env, "MPI_LOCALRANKID", "PMI_LOCAL_RANK", default=0),
            local_world_size=local_world,
            node_rank=rank // max(1, local_world),
            master_addr=addr or "",
            master_port=port,
        ), complete=addr is not None and local_known)

    return ProcessEnvironment(
        kind="single", rank=0, world_size=1, local_rank=0, local_world_size=1, node_rank=0,
        master_addr=env.get("MASTER_ADDR", "127.0.0.1"), master_port=port,
    )
