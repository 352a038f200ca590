"""The launcher killed from outside (kill -9): its trainers die with it instead of training on
and committing checkpoints with no launcher left, and a second job on the same run directory is
refused while the first holds it, with a message naming the holder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, TINY, run_env

from faults.launcher_helpers import alive, start_launch, trainer_pids, wait_until_training
from shardtune.checkpoint.manifest import list_checkpoints
from shardtune.run_dirs import hold_run_dir

pytestmark = pytest.mark.distributed

# PR_SET_PDEATHSIG acts at once; the watchdog thread polls each second. Seen: trainers lived
# for seconds after their launcher without either.
DIE_WITHIN_S = 5.0


def test_second_job_refused_and_trainers_die_with_a_killed_launcher(tmp_path):
    launcher = start_launch(tmp_path, "train.max_steps=400", "checkpoint.every_steps=1", "checkpoint.keep_last=400")
    try:
        wait_until_training(launcher, tmp_path)
        second = subprocess.run(
            [sys.executable, "-m", "shardtune", "launch", str(TINY), "--nproc", "2", f"run.output_dir={tmp_path}"],
            cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=120,
        )
        assert second.returncode == 6, second.stderr[-3000:]
        assert f"{tmp_path} is in use by pid {launcher.pid} on " in second.stderr, second.stderr[-3000:]
        assert "Traceback" not in second.stderr

        workers = trainer_pids(launcher.pid)
        assert len(workers) == 2, workers
        os.kill(launcher.pid, signal.SIGKILL)
        killed = time.monotonic()
        committed_at_kill = {c.step for c in list_checkpoints(tmp_path / "checkpoints")}
        while any(alive(p) for p in workers) and time.monotonic() - killed < 30:
            time.sleep(0.05)
        lived = time.monotonic() - killed
        assert lived < DIE_WITHIN_S, f"trainers outlived their launcher by {lived:.1f} s"
        # At most a save already past its rename when the kill landed; nothing after.
        after = {c.step for c in list_checkpoints(tmp_path / "checkpoints")} - committed_at_kill
        assert len(after) <= 1, after
    finally:
        launcher.kill()
        launcher.communicate()
    with hold_run_dir(tmp_path):  # the kernel released the dead job's lock
        pass
