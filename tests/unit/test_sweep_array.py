"""Sweeps as SLURM job arrays: the rendered script, its quoting, and collecting the table."""

from __future__ import annotations

import csv
import json
import subprocess
from dataclasses import asdict
from pathlib import Path

import pytest

from shardtune.cli import main as cli_main
from shardtune.errors import SubmitError
from shardtune.launch.slurm import SlurmArrayJob, collect_command, render_array_job
from shardtune.sweep import PLAN_FILE, TASK_FILE, collect_sweep, plan_sweep
from shardtune.train.loop import TrainResult

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests" / "configs" / "tiny.yaml"
HOSTILE = ["run.name=$(touch /tmp/pwned)", "data.path=`id`; rm -rf ~", "x='q' \"d\"\nnext"]


def _job(tasks, **changes) -> SlurmArrayJob:
    fields = dict(config=TINY, overrides=(), nodes=1, gpus_per_node=0, ranks_per_node=2, run_name="tiny-sweep",
                  output_dir=Path("/scratch/sweep"), workdir=Path("/home/me/project"), python="/opt/venv/bin/python",
                  tasks=tuple(tasks))
    return SlurmArrayJob(**{**fields, **changes})


def _task_settings(script: str, task: int) -> tuple[int, str, list[str]]:
    """What bash makes of the task's case branch: exit status, RUN_DIR, TRAIN_ARGS."""
    settings = script[: script.index("\nRESTARTS=")]
    proc = subprocess.run(["bash", "-c", f'{settings}\nprintf "%s\\0" "$RUN_DIR" "${{TRAIN_ARGS[@]}}"'],
                          env={"SLURM_ARRAY_TASK_ID": str(task), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True)
    values = proc.stdout.split("\0")[:-1]
    return proc.returncode, (values[0] if values else ""), values[1:]


def test_each_array_task_gets_its_own_combination_verbatim():
    tasks = [(Path("/scratch/sweep/a b"), (str(TINY), "finetune.strategy=full", HOSTILE[0])),
             (Path("/scratch/sweep/it's"), (str(TINY), *HOSTILE[1:]))]
    script = render_array_job(_job(tasks))
    for i, (run_dir, args) in enumerate(tasks):
        rc, got_dir, got_args = _task_settings(script, i)
        assert (rc, got_dir, got_args) == (0, str(run_dir), list(args))
    rc, _, _ = _task_settings(script, 2)  # no such combination: the task fails loudly
    assert rc == 2
    assert not Path("/tmp/pwned").exists()


def test_array_directives_logs_and_valid_bash(tmp_path):
    job = _job([(Path(f"/s/{i}"), ("x",)) for i in range(3)], max_parallel=2, time="1:00:00", partition="cpu")
    script = render_array_job(job)
    directives = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --array=0-2%2" in directives
    assert "#SBATCH --output=/scratch/sweep/slurm-%A_%a.out" in directives
    assert "#SBATCH --partition=cpu" in directives and "#SBATCH --time=1:00:00" in directives
    assert not any("gpus-per-node" in d for d in directives)  # CPU-only: the directive is left out
    assert '"$PYTHON" -m shardtune launch "${TRAIN_ARGS[@]}"' in script
    assert 'sweep-task.json' in script and 'scontrol requeue "$SLURM_JOB_ID"' in script
    path = tmp_path / "array.sbatch"
    path.write_text(script)
    subprocess.run(["bash", "-n", str(path)], check=True)


def test_array_job_refuses_no_tasks_and_bad_parallelism():
    with pytest.raises(SubmitError, match="no combination"):
        render_array_job(_job([]))
    with pytest.raises(SubmitError, match="max-parallel"):
        render_array_job(_job([(Path("/s"), ("x",))], max_parallel=0))


def test_collect_job_depends_on_the_whole_array_and_quotes_its_command():
    job = _job([(Path("/s/0"), ("x",))], output_dir=Path("/scratch/my sweep"), account="proj")
    cmd = collect_command(job, "4242")
    assert cmd[:3] == ["sbatch", "--parsable", "--dependency=afterany:4242"]
    assert "--account=proj" in cmd and "--output=/scratch/my sweep/slurm-collect-%j.out" in cmd
    assert cmd[-2:] == ["--wrap", "/opt/venv/bin/python -m shardtune sweep --collect '/scratch/my sweep'"]


def test_cli_dry_run_renders_one_task_per_combination(tmp_path, capsys):
    out = tmp_path / "sw"
    rc = cli_main(["sweep", str(TINY), "--grid", "finetune.strategy=full,lora", "--grid", "train.lr=1e-3,2e-3",
                   "--slurm", "--nproc", "2", "--out", str(out), "--dry-run", "train.max_steps=3"])
    script = capsys.readouterr().out
    assert rc == 0 and "#SBATCH --array=0-3" in script
    rc, run_dir, args = _task_settings(script, 3)
    assert run_dir == str(out / "strategy-lora_lr-2e-3")
    assert args == [str(TINY), "train.max_steps=3", "finetune.strategy=lora", "train.lr=2e-3",
                    "run.name=tiny-strategy-lora_lr-2e-3", f"run.output_dir={run_dir}"]
    assert not (out / PLAN_FILE).exists()  # a dry run submits and writes nothing


def _finished(run_dir: Path, exact_match: float, loss: float, exit_code: int) -> None:
    """What a finished array task leaves: the trainer's result.json and the script's sweep-task.json."""
    run_dir.mkdir(parents=True)
    metrics = {"loss": loss, "perplexity": 2.0 ** loss, "token_accuracy": 0.5, "exact_match": exact_match}
    baseline = {"loss": 6.0, "perplexity": 64.0, "token_accuracy": 0.0, "exact_match": 0.0}
    result = TrainResult(steps=4, stopped_reason="completed", wall_seconds=12.5, total_params=100,
                         trainable_params=40, baseline=baseline, best=metrics, best_step=4, final=metrics,
                         test=metrics)
    (run_dir / "result.json").write_text(json.dumps(asdict(result)))
    (run_dir / TASK_FILE).write_text(json.dumps({"task": 0, "job": "7", "exit_code": exit_code, "seconds": 30}))


def test_collect_writes_the_table_from_what_the_tasks_left(tmp_path):
    plan = plan_sweep(str(TINY), ["finetune.strategy=full,lora,frozen_head"], [], str(tmp_path), absolute=True)
    plan.write()
    _finished(Path(plan.runs[0]["run_dir"]), 0.75, 1.5, 0)
    _finished(Path(plan.runs[1]["run_dir"]), 0.5, 2.0, 0)
    # The third task never ran (cancelled, or still queued): it is a row all the same.
    table = collect_sweep(tmp_path).read_text()
    lines = table.splitlines()
    assert lines[0].startswith("| run | steps |") and "val exact_match (best)" in lines[0]
    assert lines[2].startswith("| **baseline** (step 0, no training) | 0 |") and "| 0.0000 |" in lines[2]
    assert lines[3].startswith("| strategy-full | 4 | 12 | 30 | 40 (40.00%) | 0.7500 | 0.7500 |")
    assert lines[5].startswith("| strategy-frozen_head (no result) | – |")
    with (tmp_path / "sweep.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["status"] for r in rows] == ["ok", "ok", "no result"]
    assert rows[1]["best_val_exact_match"] == "0.5" and rows[1]["launch_s"] == "30"


def test_collect_needs_a_sweep_directory(tmp_path, capsys):
    assert cli_main(["sweep", "--collect", str(tmp_path)]) == 2
    assert "sweep.json not found" in capsys.readouterr().err
