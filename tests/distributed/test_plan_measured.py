"""`shardtune plan`: parameter counts, per-strategy state bytes checked against live tensors
measured in real 2-rank runs, and the recommendation."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT, run_env

from shardtune.plan import state_bytes

DEMO = ROOT / "configs" / "demo-cpu.yaml"


@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero1", "zero2", "zero3"])
def test_state_estimate_within_10_percent_of_measured(strategy):
    # Gradient accumulation 2, so ZeRO-1's unpartitioned gradients are alive between micro-batches.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(ROOT / "tests" / "helpers" / "measure_states.py"), str(DEMO), f"distributed.strategy={strategy}",
           "data.synthetic.num_records=500", "train.micro_batch_size=1", "train.global_batch_size=4",
           "data.seq_len=64"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=run_env(), cwd=ROOT, timeout=300)
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 2, out.stderr[-3000:]
    weights, grads, optimizer, _ = state_bytes(strategy, rows[0]["params"], 2, bf16=False)
    estimated = weights + grads + optimizer
    for row in rows:
        assert row["bytes"] == pytest.approx(estimated, rel=0.10), (strategy, row["bytes"] / rows[0]["params"])
