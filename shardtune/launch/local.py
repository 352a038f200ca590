"""``shardtune launch``: run torchrun on this machine (or on one node of several)."""

from __future__ import annotations

import os
import signal
import sys
import threading

from shardtune.errors import INTERRUPTED_EXIT_CODE, PREEMPTED_EXIT_CODE
from shardtune.launch.forked import FORKED_TRAINER_SCRIPT, report_worker_exits_in_one_line
from shardtune.launch.trainer_signals import LAUNCHER_PID_ENV, forward_to_workers

# What a user, a batch system or a terminal sends to stop a job: each means "save and stop".
LAUNCHER_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)


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
    fork_workers: bool = False,
) -> list[str]:
    """torchrun's command line for ``shardtune train`` on ``nproc`` ranks of this node.

    ``fork_workers``: torchrun forks each worker from this process (which must have imported
    the trainer first: ``launch.forked.preload``) instead of starting a new interpreter."""
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
    if fork_workers:
        cmd += ["--start-method=fork", "--run-path", FORKED_TRAINER_SCRIPT]
    else:
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

    Stop signals to the launcher (SIGTERM, SIGINT, SIGHUP, SIGUSR1) are passed on to the
    trainers, which save at the next step and exit 75; the launcher then exits 75 too. A second
    SIGINT kills them at once (exit 130). torchrun's own handler is kept off these signals: it
    would stop the workers with a 30 s grace and then raise a traceback here (exit 1).
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    for name, value in (extra_env or {}).items():
        os.environ.setdefault(name, value)  # workers inherit this process's environment
    os.environ[LAUNCHER_PID_ENV] = str(os.getpid())  # trainers die with this process
    received: list[int] = []

    def on_signal(signum, frame) -> None:
        received.append(signum)
        again = signum == signal.SIGINT and received.count(signal.SIGINT) > 1
        threading.Thread(target=forward_to_workers, args=(signum, os.getpid()), kwargs={"force": again},
                         daemon=True).start()

    previous = {sig: signal.signal(sig, on_signal) for sig in LAUNCHER_STOP_SIGNALS}
    report_worker_exits_in_one_line()
    try:
        torchrun_main(["--signals-to-handle=SIGQUIT", *cmd[cmd.index("torch.distributed.run") + 1 :]])
    except ChildFailedError as exc:
        # torchrun reports any failed worker as exit 1; the trainers' "checkpoint saved, run me
        # again" status is passed through so a batch script can tell preemption from a crash.
        codes = {failure.exitcode for failure in exc.failures.values()}
        return launcher_exit_code(codes, received)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def launcher_exit_code(codes: set[int], received: list[int]) -> int:
    """The launcher's exit code from its workers' (``-N``: killed by signal N) and the signals it got."""
    if codes == {PREEMPTED_EXIT_CODE}:
        return PREEMPTED_EXIT_CODE
    stopped = {PREEMPTED_EXIT_CODE, -signal.SIGTERM, -signal.SIGINT, -signal.SIGKILL, INTERRUPTED_EXIT_CODE}
    if received.count(signal.SIGINT) > 1 and codes <= stopped:
        return INTERRUPTED_EXIT_CODE  # aborted at once, as asked: the last committed checkpoint stands
    if received and codes <= stopped:
        # Asked to stop, and a trainer died of the request before it could save (still starting
        # up, or torchrun tearing the group down): nothing committed is lost, rerun resumes.
        return PREEMPTED_EXIT_CODE
    own = {c for c in codes if c > 0}
    if len(own) == 1 and codes - own <= {-signal.SIGTERM}:
        # The ranks that failed agreed on why (a checkpoint error is 4 on every rank); those
        # torchrun then stopped report -15. The table's code says more to a wrapper than 1.
        return own.pop()
    return 1
