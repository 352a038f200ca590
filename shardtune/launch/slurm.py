"""``shardtune slurm submit``: render an sbatch script from a template in ``slurm/`` and submit it.

Templates are plain bash with ``{{field}}`` markers. Every value is passed through
``shlex.quote``, so a config path or override can never run as shell code; values that land in
``#SBATCH`` lines, which no shell parses, must not need quoting at all. An ``#SBATCH`` line
whose field has no value (no partition given, no GPUs) is left out.

``shardtune sweep --slurm`` renders ``slurm/sweep-array.sbatch`` (``SlurmArrayJob``): one
array task per grid combination, each task's arguments in a ``case`` branch built from
quoted words (``ShellCode``), and a dependent job that collects the table.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from shardtune.errors import SubmitError

# The repository's slurm/ folder; ``--template`` points elsewhere (a site's adapted copy).
TEMPLATE_DIR = Path(__file__).resolve().parents[2] / "slurm"
LAUNCHERS = {
    "torchrun": "torchrun.sbatch",  # one task per node running torchrun, c10d rendezvous
    "srun": "srun.sbatch",  # one task per rank, process group from SLURM variables
    "mpi": "mpi.sbatch",  # one srun --mpi=pmix task per rank, address from the mpi4py rendezvous
}
# `shardtune sweep --slurm`: one array task per grid combination.
ARRAY_TEMPLATE = "sweep-array.sbatch"
DEFAULT_WARN_SECONDS = 180
DEFAULT_MAX_REQUEUES = 3

_FIELD = re.compile(r"\{\{(\w+)\}\}")
_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$|^\d+-\d+$|^(UNLIMITED|INFINITE)$")


class ShellCode(str):
    """Shell text that shardtune built itself with every value already ``shlex.quote``-d:
    ``render_script`` inserts it as is (never into an ``#SBATCH`` line)."""


@dataclass(frozen=True)
class SlurmJob:
    config: Path | None
    overrides: tuple[str, ...]
    nodes: int
    gpus_per_node: int
    run_name: str
    output_dir: Path
    workdir: Path
    ranks_per_node: int | None = None  # default: one per GPU, or one on CPU-only nodes
    launcher: str = "torchrun"
    partition: str | None = None
    account: str | None = None
    time: str | None = None
    cpus_per_task: int | None = None
    max_requeues: int = DEFAULT_MAX_REQUEUES
    warn_seconds: int = DEFAULT_WARN_SECONDS
    python: str = field(default_factory=lambda: sys.executable)

    @property
    def job_name(self) -> str:
        return "shardtune-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", self.run_name)

    @property
    def log_file(self) -> Path:
        # %j: SLURM writes the job id; requeued runs append to the same file.
        return self.output_dir / "slurm-%j.out"

    def log_path(self, job_id: str) -> Path:
        return self.output_dir / f"slurm-{job_id}.out"

    def fields(self) -> dict[str, object]:
        ranks = self.ranks_per_node if self.ranks_per_node is not None else max(1, self.gpus_per_node)
        self._validate(ranks)
        return {
            "job_name": self.job_name,
            "nodes": self.nodes,
            "ranks_per_node": ranks,
            "gpus_per_node": self.gpus_per_node or None,
            "cpus_per_task": self.cpus_per_task,
            "partition": self.partition,
            "account": self.account,
            "time": self.time,
            "workdir": self.workdir,
            "log_file": self.log_file,
            "warn_seconds": self.warn_seconds,
            "max_requeues": self.max_requeues,
            "python": self.python,
            # No config: the trainer's embedded default, with the overrides alone.
            "train_args": [*([self.config] if self.config else []), *self.overrides],
        }

    def _validate(self, ranks: int) -> None:
        for name, value, low in [
            ("--nodes", self.nodes, 1), ("--gpus-per-node", self.gpus_per_node, 0),
            ("--ranks-per-node", ranks, 1), ("--max-requeues", self.max_requeues, 0),
            ("--warn-seconds", self.warn_seconds, 1),
            ("--cpus-per-task", 1 if self.cpus_per_task is None else self.cpus_per_task, 1),
        ]:
            if value < low:
                raise SubmitError(f"{name} must be at least {low}, got {value}")
        if self.time is not None and not _TIME.match(self.time):
            raise SubmitError(f"--time {self.time!r} is not a SLURM time such as 24:00:00 or 1-12:00:00")


def template_path(launcher: str, template: Path | None = None) -> Path:
    if launcher not in LAUNCHERS:
        raise SubmitError(f"unknown launcher {launcher!r}; choose one of {', '.join(LAUNCHERS)}")
    path = template or TEMPLATE_DIR / LAUNCHERS[launcher]
    if not path.is_file():
        raise SubmitError(
            f"sbatch template {path} not found; pass --template PATH (a copy of shardtune's slurm/*.sbatch)"
        )
    return path


def _shell_word(value: object) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(shlex.quote(str(v)) for v in value)
    return shlex.quote(str(value))


def render_script(template: str, fields: dict[str, object]) -> str:
    """Fill ``{{field}}`` markers; see the module docstring for the quoting rules."""
    lines = []
    for number, line in enumerate(template.splitlines(keepends=True), start=1):
        names = _FIELD.findall(line)
        unknown = [n for n in names if n not in fields]
        if unknown:
            raise SubmitError(f"template line {number}: unknown field(s) {', '.join(unknown)}")
        is_directive = line.startswith("#SBATCH")
        if is_directive and any(fields[n] is None for n in names):
            continue
        if not is_directive and any(fields[n] is None for n in names):
            missing = [n for n in names if fields[n] is None]
            raise SubmitError(f"template line {number}: field(s) {', '.join(missing)} have no value")

        def fill(match: re.Match, is_directive: bool = is_directive, number: int = number) -> str:
            value = fields[match.group(1)]
            if isinstance(value, ShellCode):
                if is_directive:
                    raise SubmitError(f"template line {number}: {match.group(1)} cannot go into an #SBATCH line")
                return str(value)
            word = _shell_word(value)
            if is_directive and (word != str(value) or not str(value)):
                raise SubmitError(
                    f"{match.group(1)} {str(value)!r} cannot go into an #SBATCH line: "
                    "use letters, digits and _ . , : @ % + = / - only"
                )
            return word

        lines.append(_FIELD.sub(fill, line))
    return "".join(lines)


def render_job(job: SlurmJob, template: Path | None = None) -> str:
    return render_script(template_path(job.launcher, template).read_text(), job.fields())


@dataclass(frozen=True)
class SlurmArrayJob(SlurmJob):
    """A sweep: array task ``i`` runs ``tasks[i]`` = (run directory, ``shardtune launch`` arguments).

    ``output_dir`` is the sweep directory; ``run_name`` names the job. Each task gets the
    same resources (``nodes`` x ``ranks_per_node``); ``max_parallel`` caps tasks running at once.
    """

    tasks: tuple[tuple[Path, tuple[str, ...]], ...] = ()
    max_parallel: int | None = None

    @property
    def log_file(self) -> Path:
        # %A: the array's job id, %a: the task index.
        return self.output_dir / "slurm-%A_%a.out"

    def log_path(self, job_id: str, task: int | str = "*") -> Path:
        return self.output_dir / f"slurm-{job_id}_{task}.out"

    @property
    def array(self) -> str:
        if not self.tasks:
            raise SubmitError("the sweep has no combination to run")
        if self.max_parallel is not None and self.max_parallel < 1:
            raise SubmitError(f"--max-parallel must be at least 1, got {self.max_parallel}")
        spec = f"0-{len(self.tasks) - 1}"
        return spec + (f"%{self.max_parallel}" if self.max_parallel else "")

    def fields(self) -> dict[str, object]:
        cases = []
        for i, (run_dir, args) in enumerate(self.tasks):
            cases.append(f"  {i}) RUN_DIR={shlex.quote(str(run_dir))}\n"
                         f"     TRAIN_ARGS=({_shell_word(list(args))}) ;;")
        return {**super().fields(), "array": self.array, "num_tasks": len(self.tasks),
                "task_cases": ShellCode("\n".join(cases))}


def render_array_job(job: SlurmArrayJob, template: Path | None = None) -> str:
    path = template or TEMPLATE_DIR / ARRAY_TEMPLATE
    if not path.is_file():
        raise SubmitError(f"sbatch template {path} not found; pass --template PATH (a copy of slurm/{ARRAY_TEMPLATE})")
    return render_script(path.read_text(), job.fields())


def collect_command(job: SlurmArrayJob, array_job_id: str) -> list[str]:
    """sbatch arguments of the job that writes the sweep table once every array task has ended
    (``afterany``: failed tasks are rows of the table too)."""
    command = shlex.join([job.python, "-m", "shardtune", "sweep", "--collect", str(job.output_dir)])
    cmd = ["sbatch", "--parsable", f"--dependency=afterany:{array_job_id}", f"--job-name={job.job_name}-collect",
           "--nodes=1", "--ntasks=1", f"--chdir={job.workdir}",
           f"--output={job.output_dir / 'slurm-collect-%j.out'}"]
    for flag, value in (("--partition", job.partition), ("--account", job.account)):
        if value:
            cmd.append(f"{flag}={value}")
    return [*cmd, "--wrap", command]


def _sbatch(cmd: list[str]) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError:
        raise SubmitError("sbatch not found: run this on a SLURM login node (or use --dry-run)") from None
    if proc.returncode != 0:
        raise SubmitError(f"sbatch failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    # --parsable prints "jobid" or "jobid;cluster".
    return proc.stdout.strip().split(";", 1)[0]


def submit(script: str, job: SlurmJob) -> str:
    """Write the script next to the run's outputs, sbatch it, return the job id."""
    job.output_dir.mkdir(parents=True, exist_ok=True)  # SLURM does not create the log's folder
    script_path = job.output_dir / f"{job.job_name}.sbatch"
    script_path.write_text(script)
    return _sbatch(["sbatch", "--parsable", str(script_path)])


def submit_collect(job: SlurmArrayJob, array_job_id: str) -> str:
    return _sbatch(collect_command(job, array_job_id))
