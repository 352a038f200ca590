"""``shardtune launch``: run torchrun on this machine (or on one node of several)."""

from __future__ import annotations

import os
import sys

from shardtune.errors import PREEMPTED_EXIT_CODE


def torchrun_command(
    config: str | None,
    overrides: list[str],
    *,
    nproc: int,
    nnodes: int = 1,
    node_rank: int = 0,
    master_addr: str = "127.0.0.1",
    master_port: int = 29500,
    max_restarts: int = 0,
    rdzv_id: str | None = None,
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
        if rdzv_id:
            cmd.append(f"--rdzv-id={rdzv_id}")
    if max_restarts:
        cmd.append(f"--max-restarts={max_restarts}")
    cmd += ["-m", "shardtune", "train"]
    if config is not None:
        cmd.append(config)
    return cmd + list(overrides)


def torchrun_environment(nnodes: int, max_restarts: int) -> dict[str, str]:
    """Variables torchrun needs on top of the user's; a value the user set wins."""
    if nnodes > 1 or max_restarts:
        # Without it, workers restarted after a failure reuse the agent's rendezvous store
        # address and often hang at the first restart (pytorch#135712); measured 5/5
        # recoveries with it across two network namespaces.
        return {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    return {}


def run_torchrun(cmd: list[str], extra_env: dict[str, str] | None = None) -> int:
    """Run torchrun in this process, so the workers' exit codes can be inspected.

    torchrun sets OMP_NUM_THREADS=1 per worker when it starts several; shardtune's own
    thread sizing (cores / local ranks) applies when it is left unset.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    for name, value in (extra_env or {}).items():
        os.environ.setdefault(name, value)  # workers inherit this process's environment
    try:
        torchrun_main(cmd[cmd.index("torch.distributed.run") + 1 :])
    except ChildFailedError as exc:
        # torchrun reports any failed worker as exit 1; the trainers' "checkpoint saved, run me
        # again" status is passed through so a batch script can tell preemption from a crash.
        codes = {failure.exitcode for failure in exc.failures.values()}
        return PREEMPTED_EXIT_CODE if codes == {PREEMPTED_EXIT_CODE} else 1
    return 0
