"""``shardtune compare``: two runs, one started from the other's export, side by side."""

from __future__ import annotations

import json

import yaml

from shardtune.cli import main


def _run_dir(path, name, model, task, baseline, final, data):
    path.mkdir(parents=True)
    config = {"run": {"name": name}, "task": task, "model": model,
              "data": {"source": "prepared", "prepared_dir": data}}
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    (path / "result.json").write_text(json.dumps({"task": task, "steps": 30, "baseline": baseline, "final": final}))
    (path / "data_summary.json").write_text(json.dumps({"splits": {"train": {"pairs": 90}, "validation": {"pairs": 10}}}))


def test_compare_writes_both_runs_numbers_and_the_lineage(tmp_path, capsys):
    sft, dpo = tmp_path / "runs" / "sft", tmp_path / "runs" / "dpo"
    _run_dir(sft, "sft", {"config": {"model_type": "llama"}}, "preference",
             {"loss": 0.6931, "reward_accuracy": 0.0}, {"loss": 0.5123, "reward_accuracy": 0.7},
             "pairs")
    (sft / "hf").mkdir()  # its export: the next iteration's starting model
    _run_dir(dpo, "dpo", {"name_or_path": str(sft / "hf")}, "preference",
             {"loss": 0.6931, "reward_accuracy": 0.0}, {"loss": 0.4321, "reward_accuracy": 0.85}, "pairs")
    assert main(["compare", str(sft), str(dpo), "--out", str(tmp_path / "cmp")]) == 0
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 0
    assert "| sft | final | 0.5123 | 0.7000 |" in table
    assert "| dpo | final | 0.4321 | 0.8500 |" in table
    assert f"dpo ({dpo}) <- sft ({sft}) <- llama built from its config" in table
    assert "different data" not in table
    assert table == capsys.readouterr().out
    assert main(["compare", str(sft)]) == 2  # one run is nothing to compare
