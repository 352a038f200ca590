"""A preemption signal at the awkward moments: during an evaluation, during a synchronous or
an asynchronous checkpoint save, and between a save's writes and its commit.

The signal is delivered by the trainer to itself at that exact point
(``SHARDTUNE_FAULT_SIGNAL``), so each moment is hit every time. Whatever it interrupts
finishes normally on every rank (an evaluation is never cut short on one rank only, a save
is never left half-written or repeated), the ranks agree on the request at the next step's
all-reduce, save that step, and exit 75; the rerun continues exactly as the uninterrupted
run did.
"""

from __future__ import annotations

import json

import pytest
from conftest import losses_by_step, run_shardtune

from shardtune.checkpoint.manifest import list_checkpoints, verify_checkpoint

pytestmark = pytest.mark.distributed

# Evaluations and saves at steps 2, 4, 6, 8; the signal comes at step 4.
SCHEDULE = ("eval.every=2", "checkpoint.every_steps=2", "checkpoint.keep_last=5")
PREEMPTED = "checkpoint saved); rerun the same command to resume"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[int, float]:
    out = tmp_path_factory.mktemp("uninterrupted")
    run_shardtune(out, *SCHEDULE, nproc=2)
    return losses_by_step(out)


@pytest.mark.parametrize("moment, async_save", [
    ("eval:4:1", True),             # rank 1 only, SIGUSR1, after the first evaluation batch
    ("save:4:*:SIGTERM", False),    # every rank, before the synchronous writes
    ("save:4:0", True),             # rank 0, while the asynchronous writes are in flight
    ("commit:4:1:SIGTERM", False),  # rank 1, writes done, before the rename commits them
], ids=["eval", "sync-save", "async-save", "commit"])
def test_signal_during_eval_or_save_checkpoints_and_resumes(tmp_path, uninterrupted, moment, async_save):
    async_opt = f"checkpoint.async_save={str(async_save).lower()}"
    stopped = run_shardtune(
        tmp_path, *SCHEDULE, async_opt, nproc=2, expect_ok=False,
        env={"SHARDTUNE_FAULT_SIGNAL": moment},
    )
    assert stopped.returncode == 75, stopped.stderr[-4000:]
    # Both ranks end the same way: the request travelled in step 5's all-reduce.
    assert stopped.stderr.count(f"preempted at step 5 ({PREEMPTED}") == 2, stopped.stderr[-4000:]
    ckpts = tmp_path / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step-00000005"
    assert not list(ckpts.glob(".tmp-*")), "a half-written checkpoint was left behind"
    committed = list_checkpoints(ckpts)
    # The interrupted save of step 4 committed too, once, and verifies like every other.
    assert [c.step for c in committed] == [2, 4, 5]
    for c in committed:
        verify_checkpoint(c.path, checksums=True)
    evals = [r["step"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "val"]
    assert evals == [0, 2, 4], evals  # the interrupted evaluation completed and was logged once

    resumed = run_shardtune(tmp_path, *SCHEDULE, async_opt, nproc=2)
    assert resumed.result["resumed_from"].endswith("step-00000005")
    losses = losses_by_step(tmp_path)
    assert [losses[s] for s in range(1, 9)] == [uninterrupted[s] for s in range(1, 9)]
