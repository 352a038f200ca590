"""`shardtune slurm submit` against a real two-node SLURM: both launch styles train to completion."""

from __future__ import annotations

import pytest
from conftest import TINY

from .harness import read_result

pytestmark = pytest.mark.cluster


@pytest.mark.parametrize("launcher", ["torchrun", "srun"])
def test_submitted_job_trains_on_two_nodes(slurm, tmp_path, launcher):
    out = tmp_path / "run"
    job = slurm.submit(TINY, "--nodes", 2, "--gpus-per-node", 0, "--launcher", launcher, f"run.output_dir={out}")

    state = slurm.wait_job(job, timeout=150)

    log = (out / f"slurm-{job}.out").read_text()
    assert state == "COMPLETED", log
    assert "nodes=node[0-1]" in log and "on 2 rank(s)" in log, log
    result = read_result(out)
    assert (result["steps"], result["stopped_reason"]) == (8, "completed")
