"""Real signals to the launcher process (as a terminal, a batch system or `kill` sends them).

SIGTERM, SIGINT (Ctrl-C) and SIGHUP each save a checkpoint at the next step on every rank and the
launcher exits 75, without a traceback, so a wrapper can tell it from a crash (1). A second
SIGINT aborts at once (exit 130): no new checkpoint, but nothing half-committed either.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from faults.launcher_helpers import start_launch, wait_until_training
from shardtune.checkpoint.manifest import list_checkpoints, read_latest
from shardtune.checkpoint.safe_io import check_checkpoint

pytestmark = pytest.mark.distributed

STEPS = "train.max_steps=400"
SAVED = "checkpoint saved); rerun the same command to resume"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
def test_stop_signal_to_launcher_saves_and_exits_75(tmp_path, sig):
    launcher = start_launch(tmp_path, STEPS)
    wait_until_training(launcher, tmp_path)
    os.kill(launcher.pid, sig)
    _, stderr = launcher.communicate(timeout=180)
    assert launcher.returncode == 75, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert stderr.count(SAVED) == 2, stderr[-3000:]  # both ranks, at the same step
    ckpts = tmp_path / "checkpoints"
    latest = read_latest(ckpts)
    assert latest is not None and int(latest.removeprefix("step-")) < 400
    check_checkpoint(ckpts / latest, checksums=True, tensors=True)


def test_second_sigint_aborts_at_once_and_leaves_nothing_half_committed(tmp_path):
    # Rank 1 stalls before step 2's agreement, the first step after the one training is detected
    # by, so the first Ctrl-C's save cannot finish (on a tiny model an unstalled save did, before
    # the second press; with the stall at step 3, forked workers got the stop agreed at step 2)
    # and rank 0 sits inside the collective, where only a kill reaches it.
    launcher = start_launch(tmp_path, STEPS, "checkpoint.every_steps=1", "checkpoint.keep_last=400",
                            env={"SHARDTUNE_FAULT_STALL": "2:1:600"})
    wait_until_training(launcher, tmp_path)
    os.kill(launcher.pid, signal.SIGINT)
    time.sleep(1.0)  # two presses, not one coalesced signal
    os.kill(launcher.pid, signal.SIGINT)
    start = time.monotonic()
    _, stderr = launcher.communicate(timeout=180)
    assert launcher.returncode == 130, stderr[-3000:]
    assert time.monotonic() - start < 30, "the second Ctrl-C did not stop the job at once"
    ckpts = tmp_path / "checkpoints"
    committed = list_checkpoints(ckpts)
    for c in committed:  # whatever was committed is whole; an interrupted save is only a .tmp-*
        check_checkpoint(c.path, checksums=True)
    latest = read_latest(ckpts)
    assert latest is None or (ckpts / latest).is_dir()
