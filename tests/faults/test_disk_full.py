"""Disk full during a save: the save fails cleanly on every rank, no partial checkpoint is
left, the previous one stays selected, and training continues or stops as configured."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from conftest import run_shardtune

pytestmark = pytest.mark.distributed


@pytest.fixture
def tiny_disk(tmp_path):
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a size-limited tmpfs needs root")
    mountpoint = tmp_path / "disk"
    mountpoint.mkdir()
    # Room for one tiny checkpoint (~2 MiB) but not for a second one beside it.
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mountpoint)], check=True)
    yield mountpoint
    subprocess.run(["umount", "-l", str(mountpoint)], check=False)


@pytest.mark.parametrize("action", ["continue", "stop"])
def test_disk_full_keeps_previous_checkpoint(tmp_path, tiny_disk, action):
    ckpts = tiny_disk / "checkpoints"
    run = run_shardtune(
        tmp_path / "run", f"checkpoint.dir={ckpts}", "checkpoint.every_steps=2", "checkpoint.keep_last=1",
        f"checkpoint.on_save_error={action}", nproc=2, expect_ok=(action == "continue"),
    )
    assert "checkpoint at step 4 failed" in run.stderr
    assert f"MiB free on {ckpts}" in run.stderr
    assert "the previous checkpoint is kept: step-00000002" in run.stderr
    assert (ckpts / "latest").read_text().strip() == "step-00000002"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-00000002"]  # no .tmp-* left
    if action == "continue":
        assert run.result["steps"] == 8 and run.result["stopped_reason"] == "completed"
    else:
        assert run.returncode != 0
        assert not (tmp_path / "run" / "result.json").exists()
