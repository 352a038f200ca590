"""SIGUSR1/SIGTERM to the trainer processes: every rank checkpoints at the same step boundary,
exits with code 75, and the rerun continues exactly where an uninterrupted run would be."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, TINY, losses_by_step, run_env, run_shardtune

from faults.launcher_helpers import trainer_pids

pytestmark = pytest.mark.distributed

STEPS = "train.max_steps=60"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[int, float]:
    out = tmp_path_factory.mktemp("uninterrupted")
    run_shardtune(out, STEPS, nproc=2)
    return losses_by_step(out)


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=lambda s: s.name)
def test_signal_checkpoints_exits_75_and_resumes_exactly(tmp_path, uninterrupted, sig):
    seed = random.randrange(10**6)
    print(f"fault seed {seed}")  # reproduce a failure with this seed
    delay = random.Random(seed).uniform(0.0, 0.5)
    cmd = [sys.executable, "-m", "shardtune", "launch", str(TINY), "--nproc", "2",
           f"run.output_dir={tmp_path}", STEPS]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and '"kind": "train"' in metrics.read_text()):
        time.sleep(0.05)
    time.sleep(delay)
    workers = trainer_pids(proc.pid)
    assert len(workers) == 2, workers
    for pid in workers:  # as SLURM's scancel does: every trainer gets the signal
        os.kill(pid, sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert "exitcode: 75" in stderr, stderr[-3000:]
    assert stderr.count("checkpoint saved); rerun the same command to resume") == 2
    latest = (tmp_path / "checkpoints" / "latest").read_text().strip()
    stopped_at = int(latest.removeprefix("step-"))
    assert 1 <= stopped_at < 60

    resumed = run_shardtune(tmp_path, STEPS, nproc=2)
    assert resumed.result["resumed_from"].endswith(latest)
    losses = losses_by_step(tmp_path)
    assert [losses[s] for s in range(stopped_at + 1, 61)] == [uninterrupted[s] for s in range(stopped_at + 1, 61)]
