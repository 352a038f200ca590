"""Drive the emulated cluster made by net-up.sh / slurm-up.sh from tests."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from conftest import ROOT, run_env

SCRIPTS = Path(__file__).resolve().parent
SHARDTUNE = [sys.executable, "-m", "shardtune"]


def wait_for(condition: Callable[[], object], timeout: float, what: str, poll: float = 0.3):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def logged_steps(out_dir: Path) -> int:
    """Highest train step in metrics.jsonl (0 before the first)."""
    try:
        lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [json.loads(line)["step"] for line in lines if '"train"' in line and line.endswith("}")]
    return max(steps, default=0)


def read_result(out_dir: Path) -> dict:
    return json.loads((out_dir / "result.json").read_text())


@dataclass
class Cluster:
    """Nodes node0..nodeN-1, each a network namespace with its own hostname."""

    dir: Path
    nodes: int
    spawned: list[subprocess.Popen] = field(default_factory=list)

    @property
    def slurm_conf(self) -> Path:
        return self.dir / "slurm" / "slurm.conf"

    def env(self, **extra: str) -> dict[str, str]:
        # All emulated nodes share this machine's cores: one thread per rank, or the ranks
        # of "different nodes" oversubscribe the same cores many times over.
        return run_env(SLURM_CONF=str(self.slurm_conf), OMP_NUM_THREADS="1", **extra)

    def command(self, node: int, *cmd: object) -> list[str]:
        return [str(SCRIPTS / "on-node.sh"), str(self.dir), str(node), *map(str, cmd)]

    def run(self, node: int, *cmd: object, timeout: float = 60, check: bool = True,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        proc = subprocess.run(self.command(node, *cmd), cwd=ROOT, env=env or self.env(),
                              capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(map(str, cmd))} on node{node} exited {proc.returncode}\n"
                                 f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-5000:]}")
        return proc

    def spawn(self, node: int, *cmd: object, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start a long-running command on a node; stop_spawned() ends it if the test does not."""
        with open(log, "w") as out:
            proc = subprocess.Popen(self.command(node, *cmd), cwd=ROOT, env=env or self.env(),
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.spawned.append(proc)
        return proc

    def stop_spawned(self) -> None:
        for proc in self.spawned:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.spawned.clear()


@dataclass
class Slurm:
    cluster: Cluster

    def cmd(self, *args: object, timeout: float = 30) -> str:
        return self.cluster.run(0, *args, timeout=timeout).stdout

    def submit(self, *args: object) -> str:
        out = self.cmd(*SHARDTUNE, "slurm", "submit", *args)
        match = re.search(r"submitted job (\d+)", out)
        assert match, out
        return match.group(1)

    def job_field(self, job_id: str, name: str) -> str:
        text = self.cmd("scontrol", "show", "job", job_id)
        match = re.search(rf"\b{name}=(\S+)", text)
        return match.group(1) if match else ""

    def wait_job(self, job_id: str, timeout: float) -> str:
        """Wait until the job left the queue for good (requeues included); its final state."""
        wait_for(lambda: not self.cmd("squeue", "-h", "-j", job_id).strip(), timeout, f"job {job_id}", poll=1)
        return self.job_field(job_id, "JobState")

    def signal_batch_script(self, job_id: str, sig: str) -> None:
        # What #SBATCH --signal=B:USR1@N does before the time limit, without waiting for it.
        self.cmd("scancel", "--batch", f"--signal={sig}", job_id)
