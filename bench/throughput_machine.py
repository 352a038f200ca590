"""The machine side of the throughput benchmark: load, idle waiting, matmul peak, facts.

Kept apart from bench/throughput.py (jobs and orchestration) and bench/throughput_report.py.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MATMUL_SIZE = 1024
# The probe's child processes run bench/throughput.py in its hidden --_matmul mode.
PROBE_SCRIPT = ROOT / "bench" / "throughput.py"

# --------------------------------------------------------------------------------------
# Environment, machine load


def base_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    env.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.pop(name, None)
    return env


def _cpu_jiffies() -> tuple[int, int]:
    with open("/proc/stat") as fh:
        values = [int(v) for v in fh.readline().split()[1:9]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def _own_cpu_s() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


class LoadMeter:
    """CPU time other processes used while a job ran: the noise indicator in the results."""

    def __enter__(self):
        self.t0, self.busy0, self.own0 = time.perf_counter(), _cpu_jiffies()[0], _own_cpu_s()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t0
        busy = (_cpu_jiffies()[0] - self.busy0) / os.sysconf("SC_CLK_TCK")
        own = _own_cpu_s() - self.own0
        cores = os.cpu_count() or 1
        self.foreign_frac = max(0.0, (busy - own) / max(self.wall * cores, 1e-9))
        return False


def busy_fraction(seconds: float = 1.5) -> float:
    b0, t0 = _cpu_jiffies()
    time.sleep(seconds)
    b1, t1 = _cpu_jiffies()
    return (b1 - b0) / max(t1 - t0, 1)


_IDLE_BUDGET = {"left_s": float("inf")}  # total waiting allowed in one benchmark (--idle-wait-budget)


def wait_for_idle(max_wait_s: float, threshold: float = 0.12) -> dict:
    """Wait (up to max_wait_s, and within the run's total budget) until other processes
    leave the CPUs nearly idle."""
    max_wait_s = min(max_wait_s, _IDLE_BUDGET["left_s"])
    start = time.perf_counter()
    frac = busy_fraction()
    announced = False
    while frac > threshold and time.perf_counter() - start < max_wait_s:
        if not announced:
            print(f"    machine busy ({frac:.0%} of CPU used by others); waiting up to {max_wait_s:.0f} s",
                  flush=True)
            announced = True
        time.sleep(3)
        frac = busy_fraction()
    waited = time.perf_counter() - start
    _IDLE_BUDGET["left_s"] = max(0.0, _IDLE_BUDGET["left_s"] - waited)
    return {"waited_s": round(waited, 1), "busy_before": round(frac, 3)}


# --------------------------------------------------------------------------------------
# Matmul peak


def _matmul_rates(threads: int, samples: int, start_at: float | None = None) -> list[float]:
    """fp32 1024x1024 matmul rates (FLOP/s) of this process at ``threads`` threads."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(MATMUL_SIZE, MATMUL_SIZE), torch.randn(MATMUL_SIZE, MATMUL_SIZE)
        for _ in range(3):
            a @ b
        if start_at is not None:
            time.sleep(max(0.0, start_at - time.time()))
        per_sample = 12 * threads  # ~0.25 s per sample at ~100 GFLOP/s per core
        rates = []
        for _ in range(samples):
            t0 = time.perf_counter()
            for _ in range(per_sample):
                a @ b
            rates.append(2.0 * MATMUL_SIZE**3 * per_sample / (time.perf_counter() - t0))
        return rates
    finally:
        torch.set_num_threads(previous)


def matmul_probe(threads: int, samples: int, start_at: float | None) -> None:
    """Child mode (one of the two processes of the 2p1t probe): print the rates as JSON."""
    print(json.dumps({"rates": _matmul_rates(threads, samples, start_at)}))


def measure_matmul(samples: int, max_idle_wait: float) -> dict[str, dict]:
    """One round of rates for the three layouts, each after waiting for an idle machine:
    1p1t and 1p2t in this process, 2p1t as two 1-thread processes at once (rates summed)."""
    out: dict[str, dict] = {}
    for layout, threads in (("1p1t", 1), ("1p2t", 2)):
        wait_for_idle(max_idle_wait)
        with LoadMeter() as meter:
            rates = _matmul_rates(threads, samples)
        out[layout] = {"rates": rates, "foreign_cpu_frac": round(meter.foreign_frac, 3)}

    env = dict(base_env(), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    wait_for_idle(max_idle_wait)
    start_at = time.time() + 4.0  # both import torch first, then start together
    cmd = [sys.executable, str(PROBE_SCRIPT), "--_matmul", "1", "--_samples", str(samples),
           "--_start-at", repr(start_at)]
    with LoadMeter() as meter:
        procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)]
        pair = []
        for proc in procs:
            stdout, _ = proc.communicate()
            if proc.returncode:
                raise RuntimeError("matmul probe failed")
            pair.append(json.loads(stdout.strip().splitlines()[-1])["rates"])
    out["2p1t"] = {"rates": [x + y for x, y in zip(*pair, strict=True)],
                   "foreign_cpu_frac": round(meter.foreign_frac, 3)}
    return out


def peak_rates(rounds: list[dict[str, dict]], noisy: float) -> dict[str, float]:
    """Best sample per layout (other processes only ever lower a rate), from the rounds that
    ran on a quiet machine when there is one."""
    peaks = {}
    for layout in ("1p1t", "1p2t", "2p1t"):
        quiet = [r[layout] for r in rounds if r[layout]["foreign_cpu_frac"] <= noisy] or [r[layout] for r in rounds]
        peaks[layout] = max(x for r in quiet for x in r["rates"])
    return peaks


# --------------------------------------------------------------------------------------
# Model facts (parameter count and shardtune's FLOPs per token)

# --------------------------------------------------------------------------------------


def machine_info() -> dict:
    from importlib.metadata import version

    import torch

    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    def git(*cmd):
        try:
            return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    return {
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty_paths": (git("status", "--porcelain", "--untracked-files=no") or "").splitlines(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "deepspeed": version("deepspeed"),
        "torch_parallel_info": torch.__config__.parallel_info(),
    }


