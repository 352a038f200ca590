"""The jobs bench/throughput.py runs: the models and data it uses, one job's command line for
shardtune or HF Trainer, running it (its whole process tree ended on a timeout), and reading
steady-state tokens/s out of what it wrote."""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from throughput_machine import LoadMeter, base_env

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
DEPS = ROOT / ".cache" / "bench-deps"  # accelerate for HF Trainer, kept out of the project venv
STRATEGIES = ("ddp", "fsdp", "zero1", "zero2", "zero3")

# ~21M parameters with the 2048-token vocabulary (untied embeddings): 6 x 3.16M per block
# + 2 x 1.05M embeddings/head. The example (8 layers) comes to 27.4M.
LLAMA_21M = [
    "model.config.hidden_size=512",
    "model.config.intermediate_size=1376",
    "model.config.num_hidden_layers=6",
    "model.config.num_attention_heads=8",
    "model.config.num_key_value_heads=8",
    # Half the demo's batch (8 x 256 tokens per optimizer step, micro-batch 4): ~1.5 s a step
    # on 2 cores keeps 20-step runs of every strategy and layout inside the time budget.
    "train.micro_batch_size=4",
    "train.global_batch_size=8",
]


@dataclass
class ModelSpec:
    key: str
    label: str
    overrides: list[str]  # shardtune dotted overrides on top of the demo config


MODELS = {
    # The demo config as shipped: micro-batch 8, global batch 16, seq len 256.
    "demo": ModelSpec("demo", "demo Llama", []),
    # Same data, seq len and batch as the demo config, larger model.
    "llama21m": ModelSpec("llama21m", "Llama ~21M", LLAMA_21M),
}
# Every run, shardtune and HF alike: the demo's synthetic task, fewer records than the
# demo's 40k (it only changes how long tokenizer training and packing take at start-up;
# the packed sequences are drawn from the same generator and seed).
DATA_OVERRIDES = ["data.synthetic.num_records=12000"]
QUICK_DATA_OVERRIDES = ["data.synthetic.num_records=4000"]


@dataclass
class Job:
    model: str
    impl: str  # shardtune | hf | shardtune+compile
    strategy: str  # ddp..zero3 for shardtune; "ddp" for HF (its only multi-process mode here)
    nproc: int
    threads: int  # per rank
    repeats: int = 1
    target_row: bool = False  # a row the targets are read from (noisy runs retried first)

    @property
    def layout(self) -> str:
        return f"{self.nproc}p{self.threads}t"

    @property
    def id(self) -> str:
        return f"{self.model}-{self.impl.replace('+', '_')}-{self.strategy}-{self.layout}"


@dataclass
class Measurement:
    job: Job
    repeats: list[dict] = field(default_factory=list)





# Running jobs


@dataclass
class Plan:
    warmup: int  # optimizer steps dropped
    measured: int  # optimizer steps timed
    window: int  # metrics.log_every (and the HF windows)
    timeout_s: float

    @property
    def steps(self) -> int:
        return self.warmup + self.measured


def _windows_from_steps(step_times: dict[int, float], plan: Plan, tokens_per_step: int) -> list[tuple[float, float]]:
    """(tokens, seconds) per window of plan.window steps after the warm-up."""
    out = []
    for start in range(plan.warmup, plan.steps, plan.window):
        end = min(start + plan.window, plan.steps)
        out.append(((end - start) * tokens_per_step, step_times[end] - step_times[start]))
    return out


def _summarise(windows: list[tuple[float, float]]) -> dict:
    tokens = sum(t for t, _ in windows)
    seconds = sum(s for _, s in windows)
    return {
        "tokens_per_s": tokens / seconds,
        "window_tokens_per_s": [round(t / s, 1) for t, s in windows],
        "measured_tokens": tokens,
        "measured_s": round(seconds, 3),
    }


def _job_env(job: Job) -> dict[str, str]:
    env = base_env()
    # Explicit for every implementation: torchrun would set 1 for 2 ranks anyway, and
    # shardtune sizes 1 rank to the 2 cores when unset; HF (torch's default) does the same.
    env["OMP_NUM_THREADS"] = str(job.threads)
    env["MKL_NUM_THREADS"] = str(job.threads)
    if job.impl == "hf":
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(DEPS), env.get("PYTHONPATH", "")) if p)
    return env


def _run(cmd: list[str], env: dict[str, str], log: Path, timeout_s: float) -> tuple[int, LoadMeter]:
    with log.open("w") as fh, LoadMeter() as meter:
        # Own session: on a timeout the whole tree (torchrun and its workers) is ended, not just the launcher.
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except BaseException as exc:  # a timeout, or Ctrl-C: end the whole tree
            if not isinstance(exc, subprocess.TimeoutExpired):
                os.killpg(proc.pid, signal.SIGKILL)
                raise
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=15)
                    break
                except subprocess.TimeoutExpired:
                    continue
            rc = 124
    return rc, meter


def _torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]


def run_job(job: Job, facts: dict, plan: Plan, work: Path, rep: int, tokenizer_dir: Path) -> dict:
    spec = MODELS[job.model]
    out_dir = work / f"{job.id}-r{rep}"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    common = [*facts["data_overrides"], *spec.overrides, f"train.max_steps={plan.steps}"]
    log = out_dir / "log.txt"
    tokens_per_step = facts["tokens_per_step"]

    if job.impl == "hf":
        timing = out_dir / "hf_steps.json"
        worker = [str(BENCH / "hf_trainer_worker.py"), "--out", str(timing), "--tokenizer-dir", str(tokenizer_dir),
                  "--steps", str(plan.steps), "--work-dir", str(out_dir / "hf")]
        cmd = (_torchrun(job.nproc) if job.nproc > 1 else [sys.executable]) + worker + common
    else:
        st_args = [*common, f"distributed.strategy={job.strategy}", f"run.output_dir={out_dir}",
                   f"metrics.log_every={plan.window}", "metrics.progress_bar=false", "metrics.trackers=[jsonl]",
                   # One validation batch, no checkpoint: neither is inside the timed windows, both cost wall time.
                   "eval.batches=1", "checkpoint.at_end=false", "checkpoint.resume=never"]
        if job.impl != "shardtune":
            st_args.append("train.compile=blocks")
        cmd = [sys.executable, "-m", "shardtune", "launch", "--nproc", str(job.nproc), *st_args]

    rc, meter = _run(cmd, _job_env(job), log, plan.timeout_s)
    record = {"rc": rc, "wall_s": round(meter.wall, 1), "foreign_cpu_frac": round(meter.foreign_frac, 3),
              "log": str(log.relative_to(ROOT)) if log.is_relative_to(ROOT) else str(log)}
    if rc != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        record["error"] = "\n".join(tail)
        return record

    if job.impl == "hf":
        data = json.loads(timing.read_text())
        steps = {int(s): t for s, t in data["step_times"]}
        record.update(_summarise(_windows_from_steps(steps, plan, tokens_per_step)))
        record["threads_seen"] = data["threads"]
        record["first_steps_s"] = round(steps[plan.warmup] - steps[0], 2)
    else:
        rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        train_rows = [r for r in rows if r["kind"] == "train"]
        windows, prev, reported_mfu = [], 0, []
        warm_s = 0.0
        for r in train_rows:
            step = r["step"]
            tokens = (step - prev) * tokens_per_step
            seconds = tokens / r["tokens_per_s"]
            if prev >= plan.warmup:
                windows.append((tokens, seconds))
                reported_mfu.append(r["mfu"])
            else:
                warm_s += seconds
            prev = step
        record.update(_summarise(windows))
        record["first_steps_s"] = round(warm_s, 2)
        record["shardtune_reported_mfu"] = round(statistics.median(reported_mfu), 4) if reported_mfu else None
        record["peak_memory_mib"] = train_rows[-1].get("peak_memory_mib") if train_rows else None
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("finished:"):
                record["finished_line"] = line.strip()
    return record
