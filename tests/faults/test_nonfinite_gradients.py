"""NaN/Inf in one rank's gradients while its loss stays finite: every rank takes the configured
action (skip or stop) at the same step, and a stopped run ends at once, not at a timeout.

Two injections: ``SHARDTUNE_FAULT_GRAD`` makes one rank's backward non-finite before the
gradients are reduced (an overflow inside backward); ``SHARDTUNE_FAULT_GRAD_REPLICA`` corrupts
one rank's own copy after the reduction, which under DDP no other rank ever sees.
"""

from __future__ import annotations

import pytest
from conftest import run_shardtune

from faults.test_nonfinite_loss import decisions

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("strategy, fault, value", [
    ("ddp", "SHARDTUNE_FAULT_GRAD_REPLICA", "nan"),
    ("fsdp", "SHARDTUNE_FAULT_GRAD_REPLICA", "inf"),
])
def test_nan_in_gradients_is_skipped_by_all(strategy, fault, value, tmp_path):
    run = run_shardtune(
        tmp_path, f"distributed.strategy={strategy}", "train.on_nonfinite=skip", nproc=2,
        env={fault: f"3:1:{value}"},
    )
    assert decisions(run.stderr) == {0: ["3:update skipped"], 1: ["3:update skipped"]}, run.stderr[-3000:]
    result = run.result
    assert result["skipped_steps"] == [3]
    assert result["steps"] == 8 and result["stopped_reason"] == "completed"
    assert all(loss == loss for loss in result["losses"]), "a non-finite value leaked into the weights"


@pytest.mark.parametrize("strategy, fault, what", [
    ("ddp", "SHARDTUNE_FAULT_GRAD_REPLICA", "gradients"),
    ("zero2", "SHARDTUNE_FAULT_GRAD", "gradient norm"),
])
def test_nan_in_gradients_stops_all_together(strategy, fault, what, tmp_path):
    run = run_shardtune(
        tmp_path, f"distributed.strategy={strategy}", "train.on_nonfinite=stop",
        "distributed.collective_timeout_s=30", nproc=2,
        env={fault: "4:0:inf"}, timeout=120, expect_ok=False,
    )
    assert run.returncode != 0
    assert decisions(run.stderr) == {0: ["4:stopping"], 1: ["4:stopping"]}, run.stderr[-3000:]
    assert f"stopped: non-finite {what} at step 4" in run.stderr
    assert "Timeout" not in run.stderr and "timed out" not in run.stderr
