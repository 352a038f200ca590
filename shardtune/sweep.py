"""``shardtune sweep CONFIG --grid key=v1,v2 ...``: run every combination, compare with the baseline.

Each combination is a separate ``shardtune launch`` into ``<sweep dir>/<name>``: locally, one
after another, or with ``--slurm`` as a SLURM job array (task ``i`` runs combination ``i``;
``slurm/sweep-array.sbatch``), followed by a job that depends on the whole array and runs
``shardtune sweep --collect <sweep dir>``. Then ``sweep.md`` and ``sweep.csv`` compare
validation and test metrics with the baseline (the pre-trained model at step 0, evaluated
by every run on the same split) and the cost of each run: steps, wall time, trainable
parameters. ``sweep.json`` in the sweep directory records the plan, so the table can be
(re)collected at any time from what the runs wrote.
"""

from __future__ import annotations

import csv
import itertools
import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from shardtune.config import load_config
from shardtune.errors import ConfigError
from shardtune.integrity import read_json_object

METRICS = {"classification": ["accuracy", "f1_macro", "loss"],
           "causal_lm": ["loss", "perplexity", "token_accuracy"]}
PLAN_FILE = "sweep.json"
TASK_FILE = "sweep-task.json"  # written by each SLURM array task: exit status and seconds


def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    grid = []
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise ConfigError(f"--grid {item!r} is not of the form key=v1,v2")
        grid.append((key, [v for v in values.split(",") if v != ""]))
    return grid


def combinations(grid: list[tuple[str, list[str]]]) -> list[list[str]]:
    keys = [k for k, _ in grid]
    return [[f"{k}={v}" for k, v in zip(keys, values, strict=True)]
            for values in itertools.product(*(vs for _, vs in grid))]


def run_name(overrides: list[str]) -> str:
    text = "_".join(o.split(".")[-1] for o in overrides) or "default"
    return re.sub(r"[^A-Za-z0-9_.=-]+", "-", text).replace("=", "-")


@dataclass
class SweepPlan:
    config: str | None
    overrides: list[str]
    sweep_dir: Path
    task: str
    base_name: str
    runs: list[dict]  # name, overrides (the combination), run_dir

    def launch_args(self, run: dict) -> list[str]:
        """``shardtune launch`` arguments of one combination (config, overrides, its run dir)."""
        return [*([self.config] if self.config else []), *self.overrides, *run["overrides"],
                f"run.name={self.base_name}-{run['name']}", f"run.output_dir={run['run_dir']}"]

    def write(self) -> None:
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        (self.sweep_dir / PLAN_FILE).write_text(json.dumps({
            "config": self.config, "overrides": self.overrides, "task": self.task, "base_name": self.base_name,
            "runs": self.runs}, indent=1))


def plan_sweep(config: str | None, grid_items: list[str], overrides: list[str], out: str | None = None,
               absolute: bool = False) -> SweepPlan:
    base = load_config(config, overrides)  # fails fast on a bad config, before any run
    combos = combinations(parse_grid(grid_items))
    for combo in combos:  # every combination must validate before the first one runs
        load_config(config, [*overrides, *combo])
    sweep_dir = Path(out) if out else base.output_dir.parent / f"{base.run.name}-sweep"
    if absolute:  # batch jobs may start elsewhere: no path may depend on the current directory
        sweep_dir = sweep_dir.resolve()
        config = str(Path(config).resolve()) if config else None
    names = [run_name(c) for c in combos]
    runs = [{"name": n, "overrides": c, "run_dir": str(sweep_dir / n)} for n, c in zip(names, combos, strict=True)]
    return SweepPlan(config, list(overrides), sweep_dir, base.task, base.run.name, runs)


def run_sweep(config: str | None, grid_items: list[str], overrides: list[str], *, nproc: int = 1,
              out: str | None = None, port: int = 29500) -> Path:
    plan = plan_sweep(config, grid_items, overrides, out)
    plan.write()
    rows = []
    for i, run in enumerate(plan.runs, 1):
        print(f"[sweep {i}/{len(plan.runs)}] {' '.join(run['overrides'])} -> {run['run_dir']}", flush=True)
        cmd = [sys.executable, "-m", "shardtune", "launch", "--nproc", str(nproc), "--port", str(port),
               *plan.launch_args(run), "checkpoint.resume=never"]
        start = time.perf_counter()
        proc = subprocess.run(cmd)
        elapsed = time.perf_counter() - start
        rows.append(collect_row(run["name"], run["overrides"], Path(run["run_dir"]), proc.returncode, elapsed))
    write_tables(plan.sweep_dir, rows, plan.task)
    print(f"sweep table: {plan.sweep_dir / 'sweep.md'} and {plan.sweep_dir / 'sweep.csv'}")
    return plan.sweep_dir


def submit_sweep_array(config: str | None, grid_items: list[str], overrides: list[str], args) -> int:
    """``--slurm``: write the plan, render the array script, submit it and the collect job.

    Array tasks resume their own run directory when requeued (no ``checkpoint.resume=never``
    as in local sweeps), so a sweep goes to a fresh ``--out``.
    """
    from shardtune.launch.slurm import SlurmArrayJob, render_array_job, submit, submit_collect

    plan = plan_sweep(config, grid_items, overrides, args.out, absolute=True)
    ranks = args.ranks_per_node or (args.gpus_per_node if args.gpus_per_node else args.nproc)
    job = SlurmArrayJob(
        config=Path(plan.config) if plan.config else None, overrides=tuple(overrides), nodes=args.nodes,
        gpus_per_node=args.gpus_per_node, ranks_per_node=ranks, run_name=f"{plan.base_name}-sweep",
        output_dir=plan.sweep_dir, workdir=Path.cwd(), partition=args.partition, account=args.account,
        time=args.time, cpus_per_task=args.cpus_per_task, max_requeues=args.max_requeues,
        warn_seconds=args.warn_seconds, max_parallel=args.max_parallel,
        tasks=tuple((Path(r["run_dir"]), tuple(plan.launch_args(r))) for r in plan.runs),
    )
    script = render_array_job(job, Path(args.template) if args.template else None)
    if args.dry_run:
        print(script, end="")
        return 0
    plan.write()
    array_id = submit(script, job)
    print(f"submitted job array {array_id} ({len(plan.runs)} tasks)\nlogs: {job.log_path(array_id)}")
    if not args.no_collect_job:
        collect_id = submit_collect(job, array_id)
        print(f"submitted job {collect_id}: writes {plan.sweep_dir / 'sweep.md'} when the array has ended")
    else:
        print(f"then: shardtune sweep --collect {plan.sweep_dir}")
    return 0


def collect_sweep(sweep_dir: str | Path) -> Path:
    """The tables of a sweep from its plan and what each run wrote (SLURM: after the array)."""
    sweep_dir = Path(sweep_dir)
    plan_file = sweep_dir / PLAN_FILE
    if not plan_file.is_file():
        raise ConfigError(f"{plan_file} not found: {sweep_dir} is not a sweep directory")
    plan = read_json_object(plan_file, ConfigError, "sweep plan")
    rows = []
    for run in plan["runs"]:
        run_dir = Path(run["run_dir"])
        task_file = run_dir / TASK_FILE
        try:
            task = read_json_object(task_file, ConfigError, "task report") if task_file.is_file() else {}
        except ConfigError as exc:  # one unreadable report must not hide the other runs' rows
            task = {"exit_code": f"unreadable ({exc})"}
        rows.append(collect_row(run["name"], run["overrides"], run_dir, task.get("exit_code"), task.get("seconds")))
    write_tables(sweep_dir, rows, plan["task"])
    return sweep_dir / "sweep.md"


def collect_row(name: str, combo: list[str], run_dir: Path, returncode: int | None, elapsed: float | None) -> dict:
    """``returncode`` None: the run never reported (an array task that did not start or was killed)."""
    result_file = run_dir / "result.json"
    status = "ok" if returncode == 0 else "no result" if returncode is None else f"exit {returncode}"
    row = {"run": name, "overrides": " ".join(combo), "status": status, "launch_seconds": elapsed}
    if result_file.is_file():
        try:
            row["result"] = read_json_object(result_file, ConfigError, "run result")
        except ConfigError as exc:
            row["status"] = f"unreadable result: {exc}"
            return row
        if returncode != 0:  # e.g. gloo's sporadic abort at exit after a finished run
            row["status"] = "ok" if returncode is None else f"ok (exit {returncode} after writing results)"
    classical = run_dir / "classical.json"  # classification: the TF-IDF + logistic regression reference
    if classical.is_file():
        row["classical"] = json.loads(classical.read_text())
    return row


def _metric(result: dict, part: str, key: str):
    block = result.get(part) or {}
    return block.get(key)


def write_tables(sweep_dir: Path, rows: list[dict], task: str) -> None:
    keys = list(METRICS[task])
    if any("exact_match" in ((row.get("result") or {}).get("baseline") or {}) for row in rows):
        keys.insert(0, "exact_match")  # generated answers: the headline of a chat/SFT sweep
    header = ["run", "overrides", "status", "steps", "stopped", "wall_s", "launch_s", "trainable_params", "total_params"]
    for k in keys:
        header += [f"baseline_val_{k}", f"best_val_{k}", f"test_{k}"]
    table = []
    for row in rows:
        r = row.get("result") or {}
        line = {"run": row["run"], "overrides": row["overrides"], "status": row["status"],
                "steps": r.get("steps"), "stopped": r.get("stopped_reason"),
                "wall_s": round(r["wall_seconds"], 1) if r.get("wall_seconds") else None,
                "launch_s": round(row["launch_seconds"], 1) if row["launch_seconds"] is not None else None,
                "trainable_params": r.get("trainable_params"), "total_params": r.get("total_params")}
        for k in keys:
            line[f"baseline_val_{k}"] = _metric(r, "baseline", k)
            line[f"best_val_{k}"] = _metric(r, "best", k) if r.get("best") else _metric(r, "final", k)
            line[f"test_{k}"] = _metric(r, "test", k)
        table.append(line)
    with (sweep_dir / "sweep.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=header)
        writer.writeheader()
        writer.writerows(table)
    classical = next((row["classical"] for row in rows if row.get("classical")), None)
    (sweep_dir / "sweep.md").write_text(markdown_table(table, keys, classical))
    from shardtune.eval.report import plot_sweep

    main = keys[0]
    baseline = next((t[f"baseline_val_{main}"] for t in table if t[f"baseline_val_{main}"] is not None), None)
    plot_sweep(sweep_dir / "sweep.png", [(t["run"], t[f"best_val_{main}"], t[f"test_{main}"]) for t in table],
               main, baseline, classical)


def markdown_table(table: list[dict], keys: list[str], classical: dict | None = None) -> str:
    def f(v):
        return "–" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))

    main = keys[0]
    baseline = next((t[f"baseline_val_{main}"] for t in table if t[f"baseline_val_{main}"] is not None), None)
    cols = ["run", "steps", "train+eval s", "launch s", "trainable params"]
    for k in keys:
        cols += [f"val {k} (best)", f"test {k}"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    if baseline is not None:
        base_row = table[0]
        cells = ["**baseline** (step 0, no training)", "0", "–", "–", "0"]
        for k in keys:
            cells += [f(base_row[f"baseline_val_{k}"]), "–"]
        lines.append("| " + " | ".join(cells) + " |")
    if classical:  # the same data for every run: one reference row
        cells = [f"**{classical.get('name', 'classical')}** (C={classical.get('C')})", "–", "–", "–", "–"]
        for k in keys:
            cells += [f((classical.get("validation") or {}).get(k)), f((classical.get("test") or {}).get(k))]
        lines.append("| " + " | ".join(cells) + " |")
    for t in table:
        params = t["trainable_params"]
        share = f"{params:,} ({100 * params / max(1, t['total_params']):.2f}%)" if params else "–"
        cells = [f"{t['run']}" + ("" if t["status"].startswith("ok") else f" ({t['status']})"),
                 f(t["steps"]) + (" (early stop)" if str(t["stopped"]).startswith("early") else ""),
                 f"{t['wall_s']:.0f}" if t["wall_s"] else "–",
                 f"{t['launch_s']:.0f}" if t["launch_s"] is not None else "–", share]
        for k in keys:
            cells += [f(t[f"best_val_{k}"]), f(t[f"test_{k}"])]
        lines.append("| " + " | ".join(cells) + " |")
    note = ("\n`train+eval s`: the run's own wall time; `launch s`: including process start and model "
            "loading.\nBaseline: the pre-trained model before any update (for classification, its new head is "
            "random), evaluated on the same validation split by each run. `val (best)`: the best "
            "validation evaluation; `test`: the test split, evaluated once with that best checkpoint.\n")
    if classical:
        note += ("Classical reference: fitted on the same training split, scored on the same validation "
                 "and test splits (docs/data.md).\n")
    return "\n".join(lines) + "\n" + note + "\n![sweep.png](sweep.png)\n"
