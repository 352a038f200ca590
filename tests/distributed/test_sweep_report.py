"""A tiny sweep writes its comparison table; each run's report renders with its plots;
``shardtune eval`` on the best checkpoint reproduces the run's own test metrics."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
from conftest import ROOT, run_env

from shardtune.sweep import combinations, parse_grid, run_name

TINY_CLASSIFY = ROOT / "tests" / "configs" / "tiny-classify.yaml"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_grid_is_a_cartesian_product():
    grid = parse_grid(["finetune.strategy=full,lora", "train.lr=1e-3,3e-3,1e-2"])
    combos = combinations(grid)
    assert len(combos) == 6
    assert combos[0] == ["finetune.strategy=full", "train.lr=1e-3"]
    assert len({run_name(c) for c in combos}) == 6


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    cmd = [sys.executable, "-m", "shardtune", "sweep", str(TINY_CLASSIFY),
           "--grid", "finetune.strategy=frozen_head,lora", "--out", str(out),
           "train.max_steps=4", "eval.every=2", "eval.batches=1", "metrics.plots=true"]
    proc = subprocess.run(cmd, cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


@pytest.mark.distributed  # the sweep runs `shardtune launch` (torchrun)
def test_sweep_writes_markdown_and_csv_tables(sweep):
    rows = list(csv.DictReader((sweep / "sweep.csv").open()))
    assert [r["run"] for r in rows] == ["strategy-frozen_head", "strategy-lora"]
    for row in rows:
        result = json.loads((sweep / row["run"] / "result.json").read_text())
        assert row["status"] == "ok"
        assert int(row["steps"]) == 4
        assert int(row["trainable_params"]) == result["trainable_params"] < int(row["total_params"])
        assert float(row["baseline_val_f1_macro"]) == pytest.approx(result["baseline"]["f1_macro"])
        assert float(row["test_accuracy"]) == pytest.approx(result["test"]["accuracy"])
        assert float(row["wall_s"]) > 0
    assert rows[0]["trainable_params"] != rows[1]["trainable_params"]
    md = (sweep / "sweep.md").read_text()
    assert "**baseline**" in md and "strategy-frozen_head" in md and "strategy-lora" in md
    assert md.count("\n|") >= 4  # header, rule, baseline row, two runs


@pytest.mark.distributed  # the sweep runs `shardtune launch` (torchrun)
def test_runs_carry_a_classical_reference_and_test_the_whole_test_split(sweep):
    run_dir = sweep / "strategy-lora"
    result = json.loads((run_dir / "result.json").read_text())
    summary = json.loads((run_dir / "data_summary.json").read_text())
    # eval.batches=1 caps validation (one micro-batch of 4 on one rank), not the test split.
    assert result["best"]["examples"] == 4
    assert result["test"]["examples"] == summary["splits"]["test"]["documents"] > 4
    classical = json.loads((run_dir / "classical.json").read_text())
    assert classical["test"]["examples"] == summary["splits"]["test"]["documents"]
    assert classical["validation"]["examples"] == summary["splits"]["validation"]["documents"]
    report = (run_dir / "report.md").read_text()
    assert "| TF-IDF + logistic regression, test |" in report and "the classical reference" in report
    md = (sweep / "sweep.md").read_text()
    assert "**TF-IDF + logistic regression**" in md
    assert (sweep / "sweep.png").read_bytes().startswith(PNG_MAGIC)


@pytest.mark.distributed  # the sweep runs `shardtune launch` (torchrun)
def test_report_renders_with_its_plots(sweep):
    run_dir = sweep / "strategy-lora"
    report = (run_dir / "report.md").read_text()
    for heading in ("## Objective", "## Result", "## Curves", "## Data", "## Config"):
        assert heading in report
    result = json.loads((run_dir / "result.json").read_text())
    baseline_row = next(line for line in report.splitlines() if line.startswith("| baseline"))
    assert f"{result['baseline']['f1_macro']:.4f}" in baseline_row
    assert "| **cooking** |" in report  # the test confusion matrix
    for png in ("loss.png", "metrics.png"):
        assert f"![{png}]({png})" in report
        data = (run_dir / png).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
    # The report can be rebuilt from the run directory alone.
    (run_dir / "report.md").unlink()
    proc = subprocess.run([sys.executable, "-m", "shardtune", "report", str(run_dir)], cwd=ROOT, env=run_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (run_dir / "report.md").read_text() == report


@pytest.mark.distributed  # the sweep runs `shardtune launch` (torchrun)
def test_eval_command_reproduces_the_runs_test_metrics(sweep, tmp_path):
    run_dir = sweep / "strategy-lora"
    result = json.loads((run_dir / "result.json").read_text())
    out = tmp_path / "metrics.json"
    proc = subprocess.run([sys.executable, "-m", "shardtune", "eval", result["best_checkpoint"],
                           "--split", "test", "--json", str(out)],
                          cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads(out.read_text())
    # The checkpoint's LoRA adapters were merged on export: same predictions as in training.
    assert metrics["confusion"] == result["test"]["confusion"]
    assert metrics["loss"] == pytest.approx(result["test"]["loss"], rel=1e-4)
