"""Reports people read: log axes, labelled losses, a classical reference, truncation counts,
sweep plots, epoch budgets, quiet ranks, config errors that name the user's file."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, run_env

from shardtune.config import SplitRatios, load_config
from shardtune.errors import ConfigError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _records(perplexities: list[float], smoothing_losses: list[float]) -> list[dict]:
    rows = [{"kind": "baseline", "step": 0, "loss": float(np.log(perplexities[0])), "perplexity": perplexities[0],
             "token_accuracy": 0.01}]
    for i, loss in enumerate(smoothing_losses, 1):
        rows.append({"kind": "train", "step": i, "loss": loss})
    for i, ppl in enumerate(perplexities):
        rows.append({"kind": "val", "step": 10 * i, "loss": float(np.log(ppl)), "perplexity": ppl,
                     "token_accuracy": 0.1 * i})
    return rows


def test_values_spanning_orders_of_magnitude_get_log_axes_and_losses_say_what_they_include():
    from shardtune.eval.report import loss_figure, metrics_figure

    records = _records([40_000.0, 900.0, 60.0, 9.0, 5.0], [11.0, 4.0, 2.5, 2.1])
    fig = metrics_figure(records, ["loss", "perplexity", "token_accuracy"])
    scales = {ax.get_title(): ax.get_yscale() for ax in fig.axes}
    panels = [(ax.get_yscale(), [t.get_text() for t in ax.get_legend().get_texts()]) for ax in fig.axes]
    assert ("log", ["val perplexity"]) in panels, scales
    assert ("linear", ["val token_accuracy"]) in panels  # scores in [0, 1] stay linear
    fig = loss_figure(records, {"finetune": {"label_smoothing": 0.05}})
    (ax,) = fig.axes
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("label smoothing 0.05" in label and label.startswith("train") for label in labels), labels
    assert any(label.startswith("validation") and "no smoothing" in label for label in labels), labels
    # A loss that stays within one order of magnitude keeps a linear axis.
    flat = _records([9.0, 8.0, 7.0], [2.3, 2.2])
    assert loss_figure(flat, {}).axes[0].get_yscale() == "linear"


def test_demo_configs_evaluate_often_enough_to_draw_a_curve():
    import yaml

    # The YAML itself: chat-sft.yaml names a model directory that stage 1 of its demo creates.
    for config in (ROOT / "shardtune/configs/demo-cpu.yaml", ROOT / "configs/chat-sft-pretrain.yaml",
                   ROOT / "configs/chat-sft.yaml", ROOT / "configs/classify-minilm.yaml"):
        data = yaml.safe_load(config.read_text())
        every, steps = (data.get("eval") or {}).get("every"), data["train"]["max_steps"]
        points = 2 + (steps - 1) // every if every else 2  # baseline, every n steps, the end
        assert points >= 5, (config, points)


def test_default_split_and_formats_are_documented():
    doc = (ROOT / "docs" / "data.md").read_text()
    ratios = SplitRatios()
    assert f"{ratios.train:g} / {ratios.validation:g} / {ratios.test:g}" in doc
    assert "data.prepare.splits" in doc and "shardtune/data/splits.py" in doc
    from typing import get_args

    from shardtune.config import PrepareSection

    for value in get_args(PrepareSection.model_fields["format"].annotation):
        assert f"`{value}`" in doc, value
    assert "task: classification" in doc and '"label"' in doc  # the labelled-JSONL example


def _write_run(run_dir, *, classical: bool, records: list[dict], summary: dict, task="classification"):
    run_dir.mkdir(parents=True)
    metrics = {"loss": 0.5, "accuracy": 0.81, "f1_macro": 0.80, "precision_macro": 0.8, "recall_macro": 0.8}
    result = {"task": task, "baseline": {**metrics, "accuracy": 0.25, "f1_macro": 0.1}, "best": metrics,
              "final": metrics, "test": {**metrics, "f1_macro": 0.79}, "best_step": 4, "steps": 4,
              "eval_metric": "f1_macro", "trainable_params": 10, "total_params": 100, "wall_seconds": 1.0,
              "tokens_per_s": 5.0, "stopped_reason": "max_steps"}
    (run_dir / "result.json").write_text(json.dumps(result))
    (run_dir / "config.yaml").write_text("run: {name: r}\nfinetune: {strategy: full, label_smoothing: 0.1}\n"
                                         "train: {epochs: 2, max_steps: null}\n")
    (run_dir / "data_summary.json").write_text(json.dumps(summary))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if classical:
        ref = {"name": "TF-IDF + logistic regression", "C": 3.0,
               "validation": {**metrics, "f1_macro": 0.84}, "test": {**metrics, "f1_macro": 0.85}}
        (run_dir / "classical.json").write_text(json.dumps(ref))
    return result


def test_report_shows_the_classical_reference_and_truncation_counts(tmp_path):
    from shardtune.eval.report import write_report

    records = _records([3.0, 2.0], [1.0, 0.8])
    records.append({"kind": "truncation", "step": 0, "split": "validation", "documents": 50,
                    "documents_over_seq_len": 7, "seq_len": 24, "samples": 10, "answers_over_max_new_tokens": 4,
                    "max_new_tokens": 8})
    summary = {"source": "jsonl (x)", "labels": ["a", "b"], "seq_len": 24,
               "splits": {"train": {"documents": 80}}, "truncated": {"train": 3, "validation": 7}}
    _write_run(tmp_path / "run", classical=True, records=records, summary=summary)
    report = write_report(tmp_path / "run").read_text()
    assert "| TF-IDF + logistic regression, test |" in report
    assert "did not beat the classical reference" in report and "0.7900 vs 0.8500" in report
    assert "## Warnings" in report
    assert "7 of 50 (cut" in report and "4 of 10 sampled" in report and "train 3, validation 7" in report
    assert "budget train.epochs=2)" in report


def test_metrics_plots_false_skips_the_curves_and_the_report_command_draws_them(tmp_path):
    from shardtune.eval.report import write_report

    run_dir = tmp_path / "run"
    _write_run(run_dir, classical=False, records=_records([3.0, 2.0], [1.0, 0.8]), summary={})
    (run_dir / "config.yaml").write_text("run: {name: r}\nmetrics: {plots: false}\n")
    report = write_report(run_dir).read_text()
    assert not list(run_dir.glob("*.png"))
    assert "Not drawn (metrics.plots=false)" in report and "![" not in report
    proc = subprocess.run([sys.executable, "-m", "shardtune", "report", str(run_dir)], capture_output=True,
                          text=True, env=run_env(), cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "![loss.png](loss.png)" in (run_dir / "report.md").read_text()
    assert (run_dir / "loss.png").read_bytes().startswith(PNG_MAGIC)


def test_sweep_table_and_plot_carry_the_baseline_and_the_classical_reference(tmp_path):
    from shardtune.sweep import collect_row, write_tables

    rows = []
    for i, name in enumerate(["strategy-full", "strategy-lora"]):
        _write_run(tmp_path / name, classical=True, records=[], summary={})
        rows.append(collect_row(name, [f"finetune.strategy={name[9:]}"], tmp_path / name, 0, 3.0 + i))
    write_tables(tmp_path, rows, "classification")
    md = (tmp_path / "sweep.md").read_text()
    assert "**TF-IDF + logistic regression** (C=3.0)" in md and "![sweep.png](sweep.png)" in md
    data = (tmp_path / "sweep.png").read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5000


def test_epochs_is_a_budget_of_its_own_on_the_command_line_and_in_files(tmp_path):
    from shardtune.train.components import total_optimizer_steps

    class Loader:
        def steps_per_epoch(self) -> int:
            return 70

    # tiny.yaml sets max_steps: 8; an epochs override (a sweep's grid) replaces that budget.
    cfg = load_config(ROOT / "tests/configs/tiny.yaml", ["train.epochs=3"])
    assert total_optimizer_steps(cfg, Loader()) == 210
    # Both given on the command line: epochs, capped by max_steps.
    cfg = load_config(ROOT / "tests/configs/tiny.yaml", ["train.epochs=3", "train.max_steps=100"])
    assert total_optimizer_steps(cfg, Loader()) == 100
    # A file with epochs and no max_steps: the default max_steps must not cap it.
    path = tmp_path / "epochs.yaml"
    path.write_text((ROOT / "tests/configs/tiny.yaml").read_text().replace("max_steps: 8", "epochs: 2"))
    assert "max_steps" not in path.read_text()
    assert total_optimizer_steps(load_config(path), Loader()) == 140


def test_config_errors_name_what_the_user_gave(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.lr=-1"])
    assert "demo-cpu.yaml" not in str(err.value) and "no config file given" in str(err.value)
    # A checkpoint's own config (written to a temporary file to load it) is named by its checkpoint.
    from shardtune.eval.standalone import config_for

    ckpt = tmp_path / "step_00000004"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text(json.dumps({"config": {"model": {"name_or_path": "x"},
                                                                    "train": {"lr": -1}}}))
    with pytest.raises(ConfigError) as err:
        config_for(ckpt, None, [])
    assert str(ckpt / "trainer_state.json") in str(err.value) and "/tmp/tmp" not in str(err.value)


QUIET_PROBE = """
import sys, warnings
from pathlib import Path
from shardtune.distributed.quiet import quiet_other_ranks
quiet_other_ranks(int(sys.argv[1]), Path(sys.argv[2]))
warnings.warn("probe FutureWarning", FutureWarning)
from transformers.utils import logging
logging.get_logger("transformers.modeling_utils").warning("probe LOAD REPORT")
"""


@pytest.mark.parametrize("rank", [0, 1])
def test_only_rank_zero_prints_library_warnings(tmp_path, rank):
    env = run_env(PYTHONWARNINGS="default")
    proc = subprocess.run([sys.executable, "-c", QUIET_PROBE, str(rank), str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    log = tmp_path / f"rank{rank}.log"
    if rank == 0:
        assert "probe FutureWarning" in proc.stderr and "probe LOAD REPORT" in proc.stderr
        assert not log.exists()
    else:
        assert "probe" not in proc.stderr
        text = log.read_text()
        assert "probe FutureWarning" in text and "probe LOAD REPORT" in text


def test_classical_reference_fits_the_training_split_and_scores_the_others(tmp_path):
    from shardtune.data.labelled import examples_from_records, generate_labelled_records, label_vocabulary
    from shardtune.data.tokenizer import train_tokenizer
    from shardtune.eval.classical import classical_reference

    records = generate_labelled_records(600, seed=3)
    rng = random.Random(0)
    rng.shuffle(records)
    tokenizer = train_tokenizer([r["text"] for r in records], 400, tmp_path / "tok")
    names = label_vocabulary(records, None)
    parts = {name: examples_from_records(rs, names, tokenizer, 32)
             for name, rs in (("train", records[:400]), ("validation", records[400:500]), ("test", records[500:]))}
    ref = classical_reference(parts["train"], {"validation": parts["validation"], "test": parts["test"]},
                              tokenizer, names)
    assert ref["train_documents"] == 400 and ref["C"] > 0
    for split, n in (("validation", 100), ("test", 100)):
        assert ref[split]["examples"] == n and sum(map(sum, ref[split]["confusion"])) == n
        # Topic words separate the classes; label noise and distractors keep it below 1.
        assert 0.7 < ref[split]["accuracy"] < 1.0 and ref[split]["loss"] > 0


def test_truncation_counts_answers_that_cannot_fit_max_new_tokens():
    from shardtune.data.packing import TokenizedCorpus
    from shardtune.eval.generate import generation_samples
    from shardtune.eval.truncation import truncation_record

    eos = 2
    docs, prompts = [], []
    for answer_len in (3, 12, 5, 20):  # two answers longer than 8 tokens
        prompt = [5] * 4
        docs.append(prompt + [7] * answer_len + [eos])
        prompts.append(len(prompt))

    class Source:
        corpus = TokenizedCorpus.from_documents(docs, prompts, vocab_size=10)

    samples = generation_samples(Source, 4, 64)
    record = truncation_record("validation", Source, 20, samples, 8, {eos})
    assert record["answers_over_max_new_tokens"] == 2 and record["samples"] == 4
    assert record["documents_over_seq_len"] == 1 and record["documents"] == 4  # only 4 + 20 + 1 > 20
    assert truncation_record("validation", Source, 64, samples, 32, {eos}) is None
