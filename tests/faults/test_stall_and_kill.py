"""A rank that stalls inside the step: the others fail within the collective timeout and
name it. A rank killed with SIGKILL: torchrun restarts the group, which resumes from the
latest checkpoint and ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import random
import time

import pytest
from conftest import losses_by_step, run_shardtune

pytestmark = pytest.mark.distributed

TIMEOUT_S = 10


def test_stalled_rank_is_named_within_the_timeout(tmp_path):
    start = time.monotonic()
    run = run_shardtune(
        tmp_path, f"distributed.collective_timeout_s={TIMEOUT_S}", nproc=2, expect_ok=False,
        env={"SHARDTUNE_FAULT_STALL": "3:1:600"}, timeout=200,
    )
    elapsed = time.monotonic() - start
    assert run.returncode != 0
    assert "suspect: rank 1 (last synchronised at step 2, others at 3)" in run.stderr, run.stderr[-3000:]
    assert f"within {TIMEOUT_S} s" in run.stderr
    # One line from the rank, exit code 5 from errors.py's table, not a Python traceback.
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    # Start-up (imports, tokenizer, first steps) plus one timeout, not the 600 s sleep.
    assert elapsed < 120, elapsed


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    run_shardtune(out, "train.max_steps=12", nproc=2)
    return losses_by_step(out)


@pytest.mark.parametrize("trial", range(5))
def test_worker_killed_restarts_and_resumes(tmp_path, uninterrupted, trial):
    seed = 1000 + trial
    rng = random.Random(seed)
    step, rank = rng.randint(3, 11), rng.randint(0, 1)
    print(f"fault seed {seed}: SIGKILL rank {rank} at step {step}")
    run = run_shardtune(
        tmp_path, "train.max_steps=12", "checkpoint.every_steps=2", "checkpoint.async_save=false",
        nproc=2, launch_args=["--max-restarts", "1"], env={"SHARDTUNE_FAULT_KILL": f"{step}:{rank}"},
    )
    assert run.result["resumed_from"].endswith(f"step-{(step - 1) // 2 * 2:08d}"), run.result["resumed_from"]
    losses = losses_by_step(tmp_path)
    assert losses == pytest.approx(uninterrupted, rel=0, abs=0)
