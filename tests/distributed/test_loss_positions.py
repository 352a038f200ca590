"""Loss-position-only LM head under every strategy at 2 ranks: the same loss and gradients as
the full-logits path to 1e-6, tied embeddings included (the head's weight is the embedding's,
sharded by FSDP2 and partitioned by ZeRO-3). One torchrun start serves every strategy."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT, TINY, run_env

pytestmark = pytest.mark.distributed

STRATEGIES = ["ddp", "fsdp", "zero2", "zero3"]


@pytest.fixture(scope="module")
def rows_by_strategy():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(ROOT / "tests" / "helpers" / "loss_positions_worker.py"), str(TINY), *STRATEGIES]
    out = subprocess.run(cmd, capture_output=True, text=True, env=run_env(), cwd=ROOT, timeout=600)
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("[")]
    assert out.returncode == 0 and len(lines) == len(STRATEGIES), out.stderr[-4000:]
    return {rows[0]["strategy"]: rows for rows in lines}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_selective_head_matches_full_logits(rows_by_strategy, strategy):
    for row in rows_by_strategy[strategy]:
        assert row["params"] and row["tied"], row
        assert row["grad_norm"] > 0.01, row  # gradients exist and are not all zero
        assert row["loss_diff"] <= 1e-6, row
        assert row["grad_diff"] <= 1e-6, row
