"""``shardtune launch`` forks its workers from a launcher that has imported the trainer once.

A forked worker must train exactly as an exec'd one, be found as a trainer although its command
line is the launcher's, and keep none of the launcher's signal handlers."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from conftest import losses_by_step, run_shardtune
from faults.launcher_helpers import start_launch, trainer_pids, wait_until_training

from shardtune.launch.forked import TRAINER_PROCESS_NAME
from shardtune.launch.trainer_signals import catches_signal

pytestmark = pytest.mark.distributed


def test_forked_and_execd_workers_train_identically(tmp_path):
    forked = run_shardtune(tmp_path / "fork", nproc=2)
    execd = run_shardtune(tmp_path / "exec", nproc=2, launch_args=["--worker-start", "exec"])
    assert losses_by_step(forked.out_dir) == losses_by_step(execd.out_dir)
    assert len(losses_by_step(forked.out_dir)) == 8


def test_forked_workers_are_trainers_with_their_own_signal_handlers(tmp_path):
    launcher = start_launch(tmp_path, "train.max_steps=400")
    try:
        wait_until_training(launcher, tmp_path)
        workers = trainer_pids(launcher.pid)
        assert len(workers) == 2
        for pid in workers:
            assert Path(f"/proc/{pid}/comm").read_text().strip() == TRAINER_PROCESS_NAME
            # Forked, not exec'd: the worker still shows the launcher's command line.
            assert b"launch" in Path(f"/proc/{pid}/cmdline").read_bytes()
            assert catches_signal(pid, signal.SIGTERM)  # the trainer's save-and-stop handler
            assert not catches_signal(pid, signal.SIGQUIT)  # the launcher's (torchrun's) is gone
        launcher.send_signal(signal.SIGTERM)
        _, stderr = launcher.communicate(timeout=180)
        assert launcher.returncode == 75, stderr[-3000:]
        assert "Traceback" not in stderr, stderr[-3000:]
    finally:
        launcher.kill()
        launcher.communicate()


def test_a_forked_workers_uncaught_exception_is_printed(tmp_path):
    # An invalid fault value raises a plain ValueError inside rank 0's step: a crash no handler
    # knows. torchrun keeps a forked worker's exception in an error file only; the worker must
    # print it as the interpreter of an exec'd worker does.
    run = run_shardtune(tmp_path, nproc=2, expect_ok=False, env={"SHARDTUNE_FAULT_GRAD": "3:0:bogus"})
    assert run.returncode == 1
    assert "Traceback" in run.stderr and "ValueError: fault value must be nan or inf" in run.stderr, \
        run.stderr[-3000:]
    # Rank 1's collective fails once rank 0 is gone; rank 0 reported its crash, so rank 1 names it.
    assert "suspect: rank 0 died of ValueError after synchronising step 2" in run.stderr, \
        run.stderr[-3000:]
