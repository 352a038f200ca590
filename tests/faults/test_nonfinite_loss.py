"""A NaN on one rank: every rank must take the same action at the same step, never hang."""

from __future__ import annotations

import re

import pytest
from conftest import run_shardtune

pytestmark = pytest.mark.distributed


def decisions(stderr: str) -> dict[int, list[str]]:
    found: dict[int, list[str]] = {}
    for rank, step, action in re.findall(r"\[rank (\d)\] step (\d+): non-finite \w[\w ]* on .*?; (\w[\w ]*)", stderr):
        found.setdefault(int(rank), []).append(f"{step}:{action}")
    return found


@pytest.mark.parametrize("strategy", ["ddp", "zero2"])
def test_nan_on_one_rank_is_skipped_by_all(strategy, tmp_path):
    run = run_shardtune(
        tmp_path, f"distributed.strategy={strategy}", "train.on_nonfinite=skip", nproc=2,
        env={"SHARDTUNE_FAULT_NONFINITE": "3:1"},
    )
    assert decisions(run.stderr) == {0: ["3:update skipped"], 1: ["3:update skipped"]}
    result = run.result
    assert result["skipped_steps"] == [3]
    assert result["steps"] == 8 and result["stopped_reason"] == "completed"
    logged_steps = [r["step"] for r in run.metrics("train")]
    assert 3 not in logged_steps and len(logged_steps) == 7
    assert all(loss == loss for loss in result["losses"]), "a NaN leaked into the weights"


@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
def test_nan_on_one_rank_stops_all_together(strategy, tmp_path):
    run = run_shardtune(
        tmp_path, f"distributed.strategy={strategy}", "train.on_nonfinite=stop",
        "distributed.collective_timeout_s=30", nproc=2,
        env={"SHARDTUNE_FAULT_NONFINITE": "4:0"}, timeout=120, expect_ok=False,
    )
    assert run.returncode != 0
    assert decisions(run.stderr) == {0: ["4:stopping"], 1: ["4:stopping"]}
    assert "stopped: non-finite loss at step 4" in run.stderr
    assert "Timeout" not in run.stderr and "timed out" not in run.stderr
