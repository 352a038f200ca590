"""Rendering sbatch scripts: directives, defaults, and quoting that no config value can escape."""

from __future__ import annotations

import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest

from shardtune.cli import main as cli_main
from shardtune.errors import SubmitError
from shardtune.launch.slurm import LAUNCHERS, SlurmJob, render_job, render_script
from shardtune.launch.trainer_signals import catches_signal, is_trainer_command

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests" / "configs" / "tiny.yaml"


def _job(**changes) -> SlurmJob:
    fields = dict(
        config=TINY, overrides=("train.lr=1e-3",), nodes=4, gpus_per_node=8, run_name="tiny",
        output_dir=Path("/scratch/runs/tiny"), workdir=Path("/home/me/project"), python="/opt/venv/bin/python",
    )
    return SlurmJob(**{**fields, **changes})


def _directives(script: str) -> dict[str, str]:
    options = [line.split(None, 1)[1] for line in script.splitlines() if line.startswith("#SBATCH ")]
    return dict((*option.split("=", 1), "")[:2] for option in options)


def _bash_value(script: str, name: str) -> list[str]:
    """What bash itself makes of the script's settings (everything before it talks to SLURM)."""
    settings = script[: script.index("\nRESTARTS=")]
    out = subprocess.run(["bash", "-c", f'{settings}\nprintf "%s\\0" "${{{name}[@]}}"'],
                         capture_output=True, text=True, check=True).stdout
    return out.split("\0")[:-1]


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_directives_for_a_gpu_job(launcher):
    script = render_job(_job(launcher=launcher, partition="gpu", account="proj1", time="24:00:00"))
    d = _directives(script)
    assert d["--nodes"] == "4" and d["--gpus-per-node"] == "8"
    assert d["--ntasks-per-node"] == ("1" if launcher == "torchrun" else "8")
    assert (d["--partition"], d["--account"], d["--time"]) == ("gpu", "proj1", "24:00:00")
    assert d["--output"] == "/scratch/runs/tiny/slurm-%j.out" and d["--chdir"] == "/home/me/project"
    assert "--requeue" in d and d["--open-mode"] == "append" and d["--signal"] == "B:USR1@180"
    assert not re.search(r"\{\{\w+\}\}", script)


def test_unset_options_leave_their_directives_out():
    d = _directives(render_job(_job(gpus_per_node=0, ranks_per_node=None)))
    assert not {"--partition", "--account", "--time", "--gpus-per-node", "--cpus-per-task"} & d.keys()


def test_torchrun_script_rendezvous_on_first_host_and_limits_requeues():
    script = render_job(_job(max_requeues=5, warn_seconds=600))
    assert 'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in script
    assert "--max-restarts 0" in script and "MAX_REQUEUES=5" in script
    assert "#SBATCH --signal=B:USR1@600" in script
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script
    assert _bash_value(script, "RANKS_PER_NODE") == ["8"]


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_scripts_are_valid_bash(launcher, tmp_path):
    script = tmp_path / "job.sbatch"
    script.write_text(render_job(_job(launcher=launcher)))
    subprocess.run(["bash", "-n", str(script)], check=True)


HOSTILE = [
    "train.lr=1; touch /tmp/pwned",
    "run.name=$(touch /tmp/pwned)",
    "data.path=`id`",
    "x='quoted' \"double\"",
    "multi\nline; rm -rf ~",
    "${HOME}",
    "a\\",
]


def test_overrides_reach_the_trainer_verbatim_and_never_run_as_shell():
    script = render_job(_job(overrides=tuple(HOSTILE), config=Path("/cfg dir/my config's.yaml")))
    assert _bash_value(script, "TRAIN_ARGS") == ["/cfg dir/my config's.yaml", *HOSTILE]


def test_python_path_with_spaces_is_quoted():
    script = render_job(_job(python="/opt/my venv/bin/python"))
    assert _bash_value(script, "PYTHON") == ["/opt/my venv/bin/python"]


@pytest.mark.parametrize("field, value", [
    ("partition", "gpu\n#SBATCH --uid=0"),
    ("partition", "gpu; rm -rf /"),
    ("account", "a b"),
    ("output_dir", Path("/runs/x y")),
    ("output_dir", Path("/runs/$(id)")),
    ("workdir", Path("/home/me/new\nline")),
])
def test_values_that_would_need_quoting_are_refused_in_sbatch_lines(field, value):
    with pytest.raises(SubmitError, match="cannot go into an #SBATCH line"):
        render_job(_job(**{field: value}))


@pytest.mark.parametrize("changes, message", [
    ({"time": "24h"}, "not a SLURM time"),
    ({"nodes": 0}, "--nodes must be at least 1"),
    ({"max_requeues": -1}, "--max-requeues"),
    ({"launcher": "ssh"}, "unknown launcher"),
])
def test_invalid_options_are_refused(changes, message):
    with pytest.raises(SubmitError, match=message):
        render_job(_job(**changes))


def test_job_name_is_sanitised_from_the_run_name():
    assert _directives(render_job(_job(run_name="my run; $(x)")))["--job-name"] == "shardtune-my_run_x_"


def test_render_script_rules():
    template = "#SBATCH --a={{a}}\n#SBATCH --b={{b}}\necho {{c}}\n"
    assert render_script(template, {"a": "1", "b": None, "c": "x y"}) == "#SBATCH --a=1\necho 'x y'\n"
    with pytest.raises(SubmitError, match="unknown field"):
        render_script("{{nope}}", {})
    with pytest.raises(SubmitError, match="have no value"):
        render_script("echo {{c}}", {"c": None})


def test_cli_dry_run_prints_the_script(capsys, tmp_path):
    out = tmp_path / "run"
    code = cli_main(["slurm", "submit", str(TINY), "--nodes", "2", "--gpus-per-node", "4", "--partition", "p",
                     "--time", "1:00:00", "--max-requeues", "1", "--dry-run", f"run.output_dir={out}", "train.lr=0.01"])
    script = capsys.readouterr().out
    assert code == 0 and script.startswith("#!/bin/bash")
    assert f"#SBATCH --output={out}/slurm-%j.out" in script and "MAX_REQUEUES=1" in script
    assert f"TRAIN_ARGS=({shlex.quote(str(TINY))} run.output_dir={out} train.lr=0.01)" in script
    assert not out.exists()  # a dry run writes nothing


def test_cli_reports_bad_values_without_a_traceback(capsys):
    code = cli_main(["slurm", "submit", str(TINY), "--nodes", "2", "--gpus-per-node", "0",
                     "--partition", "a;b", "--dry-run"])
    assert code == 2 and "cannot go into an #SBATCH line" in capsys.readouterr().err


def test_missing_template_is_explained(tmp_path, capsys):
    code = cli_main(["slurm", "submit", str(TINY), "--nodes", "1", "--gpus-per-node", "0",
                     "--template", str(tmp_path / "none.sbatch"), "--dry-run"])
    assert code == 2 and "--template" in capsys.readouterr().err


@pytest.mark.parametrize("argv, is_trainer", [
    (["/venv/bin/python3", "-u", "-m", "shardtune", "train", "c.yaml"], True),
    (["python", "/venv/bin/shardtune", "train", "c.yaml"], True),
    (["/venv/bin/shardtune", "train"], True),
    (["python", "-m", "torch.distributed.run", "--nproc-per-node=2", "-m", "shardtune", "train"], False),
    (["python", "-m", "shardtune", "launch", "c.yaml", "--nproc", "2"], False),
    (["srun", "python", "-m", "shardtune", "slurm", "signal-trainers", "USR1"], False),
    (["python", "/venv/bin/shardtune", "launch"], False),
    (["pkill", "-f", "shardtune train"], False),
])
def test_only_trainer_processes_are_signalled(argv, is_trainer):
    assert is_trainer_command(argv) is is_trainer


# --- the batch script's own logic, run by bash with stand-ins for srun and scontrol ---

FAKE_SRUN = """#!/bin/bash
# The relay step marks that it ran; the training step waits for it (or not) and exits $FAKE_RC.
if [[ "$*" == *signal-trainers* ]]; then
  echo "relay: $*"; touch "$FAKE_DIR/relayed"; exec sleep "${FAKE_RELAY_SECONDS:-0}"
fi
if [ -n "${FAKE_WAIT_FOR_RELAY:-}" ]; then
  for _ in $(seq 100); do [ -e "$FAKE_DIR/relayed" ] && break; sleep 0.1; done
fi
exit "$FAKE_RC"
"""
FAKE_SCONTROL = """#!/bin/bash
case "$1" in
  show) echo node0; echo node1 ;;
  requeue) echo "$2" >> "$FAKE_DIR/requeued" ;;
esac
"""


def _run_batch_script(tmp_path, rc: int, restarts: int | None, signal_usr1: bool = False, max_requeues: int = 2,
                      launcher: str = "torchrun", relay_seconds: float = 0):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in [("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)]:
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    script = tmp_path / "job.sbatch"
    script.write_text(render_job(_job(max_requeues=max_requeues, launcher=launcher)))
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin", "FAKE_DIR": str(tmp_path), "FAKE_RC": str(rc),
        "SLURM_JOB_ID": "12", "SLURM_JOB_NODELIST": "node[0-1]", "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "0",
        "FAKE_RELAY_SECONDS": str(relay_seconds),
    }
    if restarts is not None:
        env["SLURM_RESTART_COUNT"] = str(restarts)
    if signal_usr1:
        env["FAKE_WAIT_FOR_RELAY"] = "1"
    proc = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if signal_usr1:
        deadline = time.monotonic() + 10
        while not catches_signal(proc.pid, signal.SIGUSR1) and time.monotonic() < deadline:
            time.sleep(0.02)  # before its trap is set, SIGUSR1 would simply kill bash
        proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=30)
    requeued = (tmp_path / "requeued").read_text().split() if (tmp_path / "requeued").exists() else []
    return proc.returncode, out, requeued


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_warning_signal_is_relayed_and_the_checkpointed_job_requeued(tmp_path, launcher):
    code, out, requeued = _run_batch_script(tmp_path, rc=75, restarts=None, signal_usr1=True, launcher=launcher)
    assert "got SIGUSR1" in out and "relay: " in out and "signal-trainers USR1 --job 12" in out
    assert (code, requeued) == (0, ["12"]), out
    assert "requeues so far: 0 of 2" in out


def test_a_slow_relay_neither_delays_nor_masks_the_steps_status(tmp_path):
    # Seen on a loaded machine: the relay on one node outlived the training step; the script
    # then took the interrupted wait's 138 for the step's status and did not requeue.
    started = time.monotonic()
    code, out, requeued = _run_batch_script(tmp_path, rc=75, restarts=0, signal_usr1=True, relay_seconds=20)
    assert (code, requeued) == (0, ["12"]) and "exited with status 75" in out, out
    assert time.monotonic() - started < 10


def test_requeue_stops_at_the_limit(tmp_path):
    code, out, requeued = _run_batch_script(tmp_path, rc=75, restarts=2, max_requeues=2)
    assert (code, requeued) == (75, []) and "limit 2" in out


@pytest.mark.parametrize("rc", [0, 1])
def test_finished_or_crashed_jobs_are_not_requeued(tmp_path, rc):
    code, out, requeued = _run_batch_script(tmp_path, rc=rc, restarts=1)
    assert (code, requeued) == (rc, [])


def test_without_a_config_only_the_overrides_are_passed():
    assert _bash_value(render_job(_job(config=None, overrides=("train.lr=1",))), "TRAIN_ARGS") == ["train.lr=1"]
