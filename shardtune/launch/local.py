"""``shardtune launch``: spawn torchrun on this machine (or one node of several)."""

from __future__ import annotations

import os
import subprocess
import sys


def torchrun_command(
    config: str | None,
    overrides: list[str],
    *,
    nproc: int,
    nnodes: int = 1,
    node_rank: int = 0,
    master_addr: str = "127.0.0.1",
    master_port: int = 29500,
) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
    if nnodes == 1:
        # --standalone picks a free port and a private rendezvous: two local jobs never collide.
        cmd.append("--standalone")
    else:
        cmd += [
            f"--nnodes={nnodes}", f"--node-rank={node_rank}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint={master_addr}:{master_port}",
        ]
    cmd += ["-m", "shardtune", "train"]
    if config is not None:
        cmd.append(config)
    return cmd + list(overrides)


def run_torchrun(cmd: list[str]) -> int:
    # torchrun sets OMP_NUM_THREADS=1 per worker when it starts several; shardtune's own
    # thread sizing (cores / local ranks) applies when it is left unset.
    return subprocess.call(cmd, env=dict(os.environ))
