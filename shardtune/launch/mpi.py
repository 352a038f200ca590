"""``shardtune launch --mpirun``: start the ranks with Open MPI's ``mpirun`` instead of torchrun.

Each rank runs ``python -m shardtune train``; with no MASTER_ADDR the ranks meet through the
mpi4py rendezvous (distributed/mpi_rendezvous.py), which picks an address the other nodes can
reach and checks it before the process group starts. mpirun copies only part of the
environment to other nodes, so the variables shardtune and its libraries read are forwarded
with ``-x`` (their names, not their values, are on the command line).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

# Forwarded to every rank when set here (mpirun -x NAME), by exact name or prefix.
FORWARD_NAMES = ("PATH", "LD_LIBRARY_PATH", "PYTHONPATH", "OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM",
                 "MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES", "PYTHONWARNINGS")
FORWARD_PREFIXES = ("SHARDTUNE_", "DS_", "HF_", "TORCH_", "NCCL_", "WANDB_", "MLFLOW_", "TRANSFORMERS_")


def forwarded_variables(environ=None) -> list[str]:
    environ = os.environ if environ is None else environ
    return sorted(n for n in environ if n in FORWARD_NAMES or n.startswith(FORWARD_PREFIXES))


def mpirun_command(config: str | None, overrides: list[str], *, nproc: int, hosts: list[str] | None = None,
                   mpirun_args: str = "", mpirun: str = "mpirun", environ=None) -> list[str]:
    """``nproc`` ranks on each of ``hosts`` (this machine when None), in host order."""
    if nproc < 1:
        raise ValueError(f"--nproc must be at least 1, got {nproc}")
    cmd = [mpirun, "-np", str(nproc * len(hosts or [None]))]
    if hosts:
        # host:slots fills each host's slots before the next: ranks 0..nproc-1 on the first host.
        cmd += ["-H", ",".join(f"{h}:{nproc}" for h in hosts)]
    for name in forwarded_variables(environ):
        cmd += ["-x", name]
    cmd += shlex.split(mpirun_args)
    cmd += [sys.executable, "-m", "shardtune", "train"]
    if config is not None:
        cmd.append(config)
    return cmd + list(overrides)


def run_mpirun(cmd: list[str]) -> int:
    """mpirun's exit status: that of the first rank that failed, so a preempted run's
    PREEMPTED_EXIT_CODE ("checkpoint saved, run me again") reaches the caller unchanged."""
    try:
        return subprocess.run(cmd).returncode
    except FileNotFoundError:
        print(f"shardtune: {cmd[0]} not found: install Open MPI (openmpi-bin) or run shardtune launch "
              "without --mpirun", file=sys.stderr)
        return 2
