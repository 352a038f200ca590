"""Preemption on a real SLURM: warning signal -> checkpoint -> requeue -> resume -> same result.

The signal goes to the batch script only (`scancel --batch --signal=USR1`), exactly what
`#SBATCH --signal=B:USR1@N` does before a time limit; SLURM's own timer polls every ~30 s
and would only slow the test down.
"""

from __future__ import annotations

import math

import pytest
from conftest import TINY

from .harness import logged_steps, read_result, wait_for

pytestmark = pytest.mark.cluster

STEPS = 200  # long enough for the signal to land mid-run, ~10 s of training per attempt


def test_preempted_job_checkpoints_requeues_and_resumes_to_the_same_result(slurm, tmp_path):
    common = (TINY, "--nodes", 2, "--gpus-per-node", 0, f"train.max_steps={STEPS}")
    reference_out, preempted_out = tmp_path / "reference", tmp_path / "preempted"
    # Both jobs fit on the nodes at once: the uninterrupted reference runs alongside.
    reference = slurm.submit(*common, f"run.output_dir={reference_out}", "--max-requeues", 0)
    job = slurm.submit(*common, f"run.output_dir={preempted_out}", "--max-requeues", 2)

    wait_for(lambda: logged_steps(preempted_out) >= 10, timeout=120, what="step 10 of the job to preempt")
    slurm.signal_batch_script(job, "USR1")
    state = slurm.wait_job(job, timeout=240)

    log = (preempted_out / f"slurm-{job}.out").read_text()
    assert state == "COMPLETED", log
    assert slurm.job_field(job, "Restarts") == "1", log
    for expected in ["got SIGUSR1", "sent SIGUSR1 to trainer", "exited with status 75",
                     "requeueing job", "requeues so far: 1 of 2", "resumed from"]:
        assert expected in log, f"{expected!r} missing from the job log:\n{log}"
    resumed = read_result(preempted_out)
    assert (resumed["steps"], resumed["stopped_reason"]) == (STEPS, "completed")
    assert 10 <= resumed["start_step"] < STEPS, resumed["start_step"]

    assert slurm.wait_job(reference, timeout=120) == "COMPLETED"
    uninterrupted = read_result(reference_out)
    assert uninterrupted["start_step"] == 0 and uninterrupted["steps"] == STEPS
    assert math.isclose(resumed["losses"][-1], uninterrupted["losses"][-1], rel_tol=1e-6, abs_tol=1e-6)
    assert math.isclose(resumed["val_after"], uninterrupted["val_after"], rel_tol=1e-6, abs_tol=1e-6)
