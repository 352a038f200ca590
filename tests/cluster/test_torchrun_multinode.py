"""`shardtune launch --nnodes 2` across two network namespaces: c10d rendezvous by hostname,
and torchrun restarting the group after one worker is killed, resuming from a checkpoint."""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path

import pytest
from conftest import TINY

from shardtune.launch.trainer_signals import is_trainer_process

from .harness import SHARDTUNE, logged_steps, read_result, wait_for

pytestmark = pytest.mark.cluster

STEPS = 80
CHECKPOINT_EVERY = 10


def _launch(cluster, node: int, out: Path, log: Path, port: int, *extra: object):
    return cluster.spawn(
        node, *SHARDTUNE, "launch", TINY, "--nnodes", 2, "--node-rank", node, "--master", "node0",
        "--port", port, "--rdzv-id", f"test-{port}", *extra,
        f"run.output_dir={out}", f"train.max_steps={STEPS}", f"checkpoint.every_steps={CHECKPOINT_EVERY}",
        log=log,
    )


def _workers_of(agent_pid: int) -> list[int]:
    workers = []
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit() or int((entry / "stat").read_text().rpartition(")")[2].split()[1]) != agent_pid:
                continue
        except (OSError, IndexError):
            continue
        if is_trainer_process(int(entry.name)):
            workers.append(int(entry.name))
    return workers


def test_two_node_torchrun_restarts_a_killed_worker_and_resumes(spawned, tmp_path):
    cluster = spawned
    out, reference_out = tmp_path / "run", tmp_path / "reference"
    agents = [_launch(cluster, node, out, tmp_path / f"node{node}.log", 29400, "--max-restarts", 2) for node in (0, 1)]
    # The same two-node run without the kill, alongside: resuming must change nothing.
    references = [_launch(cluster, node, reference_out, tmp_path / f"ref{node}.log", 29401) for node in (0, 1)]

    wait_for(lambda: (out / "checkpoints" / f"step-{2 * CHECKPOINT_EVERY:08d}").is_dir(), timeout=120,
             what="a checkpoint to resume from")
    killed_at = logged_steps(out)
    workers = _workers_of(agents[1].pid)
    assert len(workers) == 1, workers
    os.kill(workers[0], signal.SIGKILL)

    for agent in agents:
        agent.wait(timeout=180)
    logs = "".join((tmp_path / f"node{n}.log").read_text() for n in (0, 1))
    assert [a.returncode for a in agents] == [0, 0], logs[-6000:]
    assert logs.count("on 2 rank(s)") == 2, "expected one start and one restart of the group"
    result = read_result(out)
    assert (result["steps"], result["stopped_reason"]) == (STEPS, "completed")
    assert CHECKPOINT_EVERY <= result["start_step"] <= killed_at + CHECKPOINT_EVERY, (result["start_step"], killed_at)

    for agent in references:
        agent.wait(timeout=120)
    uninterrupted = read_result(reference_out)
    assert math.isclose(result["losses"][-1], uninterrupted["losses"][-1], rel_tol=1e-6, abs_tol=1e-6)
