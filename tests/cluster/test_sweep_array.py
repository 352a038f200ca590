"""`shardtune sweep --slurm` on a real two-node SLURM: a 2-task job array, one combination per
task (each on its own node), then the dependent collect job writes the comparison table."""

from __future__ import annotations

import csv
import json
import re

import pytest
from conftest import TINY

from .harness import SHARDTUNE

pytestmark = pytest.mark.cluster


def test_sweep_array_runs_each_combination_and_collects_the_table(slurm, tmp_path):
    out = tmp_path / "sweep"
    submitted = slurm.cmd(*SHARDTUNE, "sweep", TINY, "--grid", "finetune.strategy=full,lora", "--slurm",
                          "--nproc", 1, "--out", out, "train.max_steps=3", "eval.every=null")
    array = re.search(r"submitted job array (\d+) \(2 tasks\)", submitted)
    collect = re.search(r"submitted job (\d+): writes", submitted)
    assert array and collect, submitted

    state = slurm.wait_job(collect.group(1), timeout=240)  # it starts only after both tasks ended

    logs = "".join(p.read_text() for p in sorted(out.glob("slurm-*.out")))
    assert state == "COMPLETED", logs
    runs = {}
    for task, name in enumerate(["strategy-full", "strategy-lora"]):
        run_dir = out / name
        assert f"array task {task} (job" in (out / f"slurm-{array.group(1)}_{task}.out").read_text(), logs
        assert json.loads((run_dir / "sweep-task.json").read_text())["exit_code"] == 0, logs
        runs[name] = json.loads((run_dir / "result.json").read_text())
        assert (runs[name]["steps"], runs[name]["finetune"]) == (3, name.split("-")[1])
    with (out / "sweep.csv").open() as fh:
        rows = {r["run"]: r for r in csv.DictReader(fh)}
    assert rows.keys() == runs.keys() and all(r["status"] == "ok" for r in rows.values())
    assert int(rows["strategy-lora"]["trainable_params"]) < int(rows["strategy-full"]["trainable_params"])
    table = (out / "sweep.md").read_text()
    assert "| strategy-full | 3 |" in table and "| strategy-lora | 3 |" in table, table
