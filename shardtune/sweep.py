"""``shardtune sweep CONFIG --grid key=v1,v2 ...``: run every combination, compare with the baseline.

Each combination is a separate ``shardtune launch`` (locally, one after another) into
``<sweep dir>/<name>``; then ``sweep.md`` and ``sweep.csv`` compare validation and test
metrics with the baseline (the pre-trained model at step 0, evaluated by every run on the
same split) and the cost of each run: steps, wall time, trainable parameters.
"""

from __future__ import annotations

import csv
import itertools
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from shardtune.config import ConfigError, load_config

METRICS = {"classification": ["accuracy", "f1_macro", "loss"], "causal_lm": ["loss", "perplexity", "token_accuracy"]}


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


def run_sweep(config: str | None, grid_items: list[str], overrides: list[str], *, nproc: int = 1,
              out: str | None = None, port: int = 29500) -> Path:
    base = load_config(config, overrides)  # fails fast on a bad config, before any run
    grid = parse_grid(grid_items)
    combos = combinations(grid)
    for combo in combos:  # every combination must validate before the first one runs
        load_config(config, [*overrides, *combo])
    sweep_dir = Path(out) if out else base.output_dir.parent / f"{base.run.name}-sweep"
    sweep_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, combo in enumerate(combos, 1):
        name = run_name(combo)
        run_dir = sweep_dir / name
        print(f"[sweep {i}/{len(combos)}] {' '.join(combo)} -> {run_dir}", flush=True)
        cmd = [sys.executable, "-m", "shardtune", "launch", *([config] if config else []), "--nproc", str(nproc),
               "--port", str(port), *overrides, *combo, f"run.name={base.run.name}-{name}",
               f"run.output_dir={run_dir}", "checkpoint.resume=never"]
        start = time.perf_counter()
        proc = subprocess.run(cmd)
        elapsed = time.perf_counter() - start
        rows.append(collect_row(name, combo, run_dir, proc.returncode, elapsed))
    write_tables(sweep_dir, rows, base.task)
    print(f"sweep table: {sweep_dir / 'sweep.md'} and {sweep_dir / 'sweep.csv'}")
    return sweep_dir


def collect_row(name: str, combo: list[str], run_dir: Path, returncode: int, elapsed: float) -> dict:
    result_file = run_dir / "result.json"
    row = {"run": name, "overrides": " ".join(combo), "status": "ok" if returncode == 0 else f"exit {returncode}",
           "launch_seconds": elapsed}
    if result_file.is_file():
        row["result"] = json.loads(result_file.read_text())
        if returncode != 0:  # e.g. gloo's sporadic abort at exit after a finished run
            row["status"] = f"ok (exit {returncode} after writing results)"
    return row


def _metric(result: dict, part: str, key: str):
    block = result.get(part) or {}
    return block.get(key)


def write_tables(sweep_dir: Path, rows: list[dict], task: str) -> None:
    keys = METRICS[task]
    header = ["run", "overrides", "status", "steps", "stopped", "wall_s", "launch_s", "trainable_params", "total_params"]
    for k in keys:
        header += [f"baseline_val_{k}", f"best_val_{k}", f"test_{k}"]
    table = []
    for row in rows:
        r = row.get("result") or {}
        line = {"run": row["run"], "overrides": row["overrides"], "status": row["status"],
                "steps": r.get("steps"), "stopped": r.get("stopped_reason"),
                "wall_s": round(r["wall_seconds"], 1) if r.get("wall_seconds") else None,
                "launch_s": round(row["launch_seconds"], 1),
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
    (sweep_dir / "sweep.md").write_text(markdown_table(table, keys))


def markdown_table(table: list[dict], keys: list[str]) -> str:
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
    for t in table:
        params = t["trainable_params"]
        share = f"{params:,} ({100 * params / max(1, t['total_params']):.2f}%)" if params else "–"
        cells = [f"{t['run']}" + ("" if t["status"].startswith("ok") else f" ({t['status']})"),
                 f(t["steps"]) + (" (early stop)" if str(t["stopped"]).startswith("early") else ""),
                 f"{t['wall_s']:.0f}" if t["wall_s"] else "–", f"{t['launch_s']:.0f}", share]
        for k in keys:
            cells += [f(t[f"best_val_{k}"]), f(t[f"test_{k}"])]
        lines.append("| " + " | ".join(cells) + " |")
    note = ("\n`train+eval s`: the run's own wall time; `launch s`: including process start and model "
            "loading.\nBaseline: the pre-trained model before any update (for classification, its new head is "
            "random), evaluated on the same validation split by each run. `val (best)`: the best "
            "validation evaluation; `test`: the test split, evaluated once with that best checkpoint.\n")
    return "\n".join(lines) + "\n" + note
