"""Start ``shardtune launch`` as a user would, wait for it to train, find its trainer processes."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from conftest import ROOT, TINY, run_env

from shardtune.launch.trainer_signals import is_trainer_process


def start_launch(out_dir: Path, *overrides: str, nproc: int = 2, env: dict[str, str] | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "shardtune", "launch", str(TINY), "--nproc", str(nproc),
           f"run.output_dir={out_dir}", *overrides]
    return subprocess.Popen(cmd, cwd=ROOT, env=run_env(**(env or {})), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_until_training(launcher: subprocess.Popen, out_dir: Path, timeout: float = 240) -> None:
    metrics = out_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.is_file() and '"kind": "train"' in metrics.read_text():
            return
        if launcher.poll() is not None:
            raise AssertionError(f"the launcher exited {launcher.returncode} before training:\n"
                                 f"{launcher.stderr.read()[-3000:]}")
        time.sleep(0.1)
    raise AssertionError("no training step logged in time")


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def trainer_pids(launcher_pid: int) -> list[int]:
    """Trainers (exec'd or forked) among the launcher's children and grandchildren."""
    found = []
    for pid in _children(launcher_pid) + [g for c in _children(launcher_pid) for g in _children(c)]:
        if is_trainer_process(pid):
            found.append(pid)
    return found


def alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped has already exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"
