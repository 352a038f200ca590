"""``report.md`` for a run directory: objective, data, config, baseline vs fine-tuned, plots.

Everything comes from files the run already wrote (config.yaml, data_summary.json,
metrics.jsonl, result.json), so ``shardtune report RUN_DIR`` can (re)build it at any time.
Plots are PNGs drawn with matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

from shardtune.errors import ConfigError
from shardtune.integrity import read_json_object

HEADLINE = {
    "classification": ["loss", "accuracy", "f1_macro", "precision_macro", "recall_macro"],
    "causal_lm": ["loss", "perplexity", "token_accuracy"],
    "preference": ["loss", "reward_accuracy", "reward_margin", "chosen_logp", "rejected_logp", "logp_accuracy"],
}


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _fmt(value) -> str:
    if value is None:
        return "–"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def metrics_table(result: dict, keys: list[str], classical: dict | None = None) -> str:
    rows = [("baseline (step 0, before fine-tuning)", result.get("baseline")),
            (f"best validation (step {result.get('best_step')})", result.get("best")),
            (f"final validation (step {result.get('steps')})", result.get("final")),
            ("test (best checkpoint)", result.get("test"))]
    if classical:
        name = classical.get("name", "classical reference")
        rows += [(f"{name}, validation", classical.get("validation")), (f"{name}, test", classical.get("test"))]
    lines = ["| | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name, m in rows:
        if m:
            lines.append(f"| {name} | " + " | ".join(_fmt(m.get(k)) for k in keys) + " |")
    base, best = result.get("baseline") or {}, result.get("best") or result.get("final") or {}
    delta = [_fmt(best[k] - base[k]) if k in best and k in base else "–" for k in keys]
    lines.append("| **improvement (best − baseline)** | " + " | ".join(delta) + " |")
    return "\n".join(lines)


def wants_log_axis(values: list[float]) -> bool:
    """Log scale when positive values span more than an order of magnitude (perplexity from a
    baseline of 40,000 down to 5 is a flat line at zero on a linear axis)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return bool(finite) and min(finite) > 0 and max(finite) / min(finite) > 10


def loss_labels(config: dict) -> tuple[str, str]:
    """What each loss curve includes: training adds label smoothing, evaluation never does."""
    smoothing = float((config.get("finetune") or {}).get("label_smoothing") or 0.0)
    train = f"train loss (cross-entropy with label smoothing {smoothing:g})" if smoothing else "train loss (cross-entropy)"
    return train, "validation loss (cross-entropy, no smoothing)"


def loss_figure(records: list[dict], config: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r["kind"] == "train" and "loss" in r]
    val = [r for r in records if r["kind"] == "val"]
    baseline = next((r for r in records if r["kind"] == "baseline"), None)
    train_label, val_label = loss_labels(config)
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label=train_label, alpha=0.7)
    if val:
        ax.plot([r["step"] for r in val], [r["loss"] for r in val], "o-", label=val_label)
    if baseline:
        ax.axhline(baseline["loss"], color="grey", ls="--", label="baseline (validation, step 0)")
    values = [r["loss"] for r in train + val] + ([baseline["loss"]] if baseline else [])
    if wants_log_axis(values):
        ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss" + (" (log scale)" if ax.get_yscale() == "log" else ""))
    ax.set_title("Loss")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def metrics_figure(records: list[dict], keys: list[str]):
    """Validation metrics per evaluation; None when there are none besides the loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    val = [r for r in records if r["kind"] == "val"]
    baseline = next((r for r in records if r["kind"] == "baseline"), None)
    shown = [k for k in keys if k != "loss" and any(k in r for r in val)]
    # Scores in [0, 1] share one axis; perplexity (unbounded) gets its own.
    panels = [[k for k in shown if k != "perplexity"]] + ([["perplexity"]] if "perplexity" in shown else [])
    panels = [p for p in panels if p]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        values = []
        for key in panel:
            points = [r for r in val if key in r]  # exact match may be generated at some evaluations only
            line, = ax.plot([r["step"] for r in points], [r[key] for r in points], "o-", label=f"val {key}")
            values += [r[key] for r in points]
            if baseline and key in baseline:
                ax.axhline(baseline[key], color=line.get_color(), ls=":", alpha=0.8)
                values.append(baseline[key])
        if wants_log_axis(values):
            ax.set_yscale("log")
            ax.set_ylabel("log scale")
        ax.set_xlabel("optimizer step")
        ax.set_title("Validation metrics (dotted: baseline)")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_curves(run_dir: Path, records: list[dict], keys: list[str], config: dict | None = None) -> list[str]:
    import matplotlib.pyplot as plt

    written = []
    for name, fig in (("loss.png", loss_figure(records, config or {})), ("metrics.png", metrics_figure(records, keys))):
        if fig is not None:
            fig.savefig(run_dir / name, dpi=110)
            plt.close(fig)
            written.append(name)
    return written


def plot_sweep(path: Path, runs: list[tuple[str, float | None, float | None]], key: str,
               baseline: float | None, classical: dict | None) -> None:
    """One bar pair per run (best validation, test ``key``); baseline and classical reference as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(runs) + 2), 4))
    x = np.arange(len(runs))
    nan = float("nan")
    ax.bar(x - 0.2, [v if v is not None else nan for _, v, _ in runs], 0.4, label=f"best validation {key}")
    ax.bar(x + 0.2, [t if t is not None else nan for _, _, t in runs], 0.4, label=f"test {key}")
    if baseline is not None:
        ax.axhline(baseline, color="grey", ls="--", label=f"baseline (step 0) {baseline:.4f}")
    if classical:
        for split, style in (("validation", ":"), ("test", "-.")):
            value = (classical.get(split) or {}).get(key)
            if value is not None:
                ax.axhline(value, color="black", ls=style, label=f"{classical.get('name', 'classical')} "
                                                                 f"({split}) {value:.4f}")
    ax.set_xticks(x, [name for name, _, _ in runs], rotation=20, ha="right")
    ax.set_ylabel(key)
    ax.set_title(f"Sweep: {key} per run")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def classical_verdict(result: dict, classical: dict | None, metric: str) -> str | None:
    """One sentence: did fine-tuning beat the classical reference on the test split (else validation)?"""
    if not classical:
        return None
    for split, ours in (("test", result.get("test")), ("validation", result.get("best") or result.get("final"))):
        theirs = (classical.get(split) or {}).get(metric)
        mine = (ours or {}).get(metric)
        if theirs is not None and mine is not None:
            lower = metric in ("loss", "perplexity")
            won = mine < theirs if lower else mine > theirs
            return (f"Fine-tuning {'beat' if won else 'did not beat'} the classical reference "
                    f"({classical.get('name')}, C={classical.get('C')}, fitted on the same training split) on "
                    f"{split} {metric}: {mine:.4f} vs {theirs:.4f}.")
    return None


def warnings_section(summary: dict, records: list[dict]) -> list[str]:
    """Truncations that change what the metrics mean, with their counts."""
    lines = []
    truncated = summary.get("truncated")  # classification: texts cut to data.seq_len, per split
    if truncated and any(truncated.values()):
        lines.append(f"- Texts truncated to data.seq_len={summary.get('seq_len')}: "
                     + ", ".join(f"{split} {n}" for split, n in truncated.items()) + ".")
    packing = summary.get("packing") or {}
    if packing.get("truncated_documents"):
        lines.append(f"- Training documents truncated to data.seq_len by whole_documents packing: "
                     f"{packing['truncated_documents']} ({packing.get('truncated_targets', 0)} loss tokens cut).")
    for r in records:
        if r.get("kind") != "truncation":
            continue
        if r.get("documents_over_seq_len"):
            lines.append(f"- {r['split']} documents longer than data.seq_len={r['seq_len']}: "
                         f"{r['documents_over_seq_len']} of {r['documents']} (cut across sequences or truncated).")
        if r.get("answers_over_max_new_tokens"):
            lines.append(f"- {r['split']} reference answers longer than eval.generate.max_new_tokens="
                         f"{r['max_new_tokens']}: {r['answers_over_max_new_tokens']} of {r['samples']} sampled; "
                         "they cannot be matched exactly.")
    return ["", "## Warnings", "", *lines] if lines else []


def _data_section(summary: dict) -> list[str]:
    if not summary:
        return ["(no data summary recorded)"]
    lines = [f"Source: {summary.get('source', '?')}."]
    labels = summary.get("labels")
    if labels:
        lines.append(f"Labels ({len(labels)}): {', '.join(labels)}; sequence length {summary.get('seq_len')}.")
    lines += ["", "| split | documents |" + (" per-label counts |" if labels else ""),
              "|---|---|" + ("---|" if labels else "")]
    for split, info in summary.get("splits", {}).items():
        counts = info.get("label_counts")
        lines.append(f"| {split} | {info.get('documents')} |" + (f" {counts} |" if labels else ""))
    return lines


def _generations_section(records: list[dict]) -> list[str]:
    """Greedy answers at the baseline and in the last evaluation that generated (rank 0's first few)."""
    generated = [r for r in records if r.get("generations") and r["kind"] in ("val", "test")]
    if not generated:
        return []
    lines = ["", "Generated answers (greedy; exact match after normalisation):", "",
             "| when | prompt (end) | reference | generated | match |", "|---|---|---|---|---|"]
    picks = [generated[0]] + ([generated[-1]] if len(generated) > 1 else [])
    for r in picks:
        when = "baseline" if r["step"] == 0 and r["kind"] == "val" else f"{r['kind']} step {r['step']}"
        for g in r["generations"]:
            cells = [g["prompt"][-50:], g["reference"], g["generated"]]
            cells = [c.replace("|", "\\|").replace("\n", "⏎") for c in cells]
            lines.append(f"| {when} | {' | '.join(cells)} | {'yes' if g['match'] else 'no'} |")
    return lines


def _budget(config: dict) -> str:
    train = config.get("train") or {}
    epochs, steps = train.get("epochs"), train.get("max_steps")
    if epochs is not None:
        return f"train.epochs={epochs:g}" + (f", at most {steps} steps" if steps is not None else "")
    return f"train.max_steps={steps}"


def _evaluated_on(config: dict) -> str:
    if config.get("eval", {}).get("split") == "train":
        return ("**training split** (eval.split=train: the data has no validation split, so these numbers "
                "measure fit, not generalisation)")
    return "validation split"


def write_report(run_dir: str | Path, plots: bool | None = None) -> Path:
    """``plots``: draw the curves; None = as the run's metrics.plots says."""
    run_dir = Path(run_dir)
    result = read_json_object(run_dir / "result.json", ConfigError, "run result")
    config_text = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").is_file() else ""
    config = yaml.safe_load(config_text) if config_text else {}
    summary_file = run_dir / "data_summary.json"
    summary = read_json_object(summary_file, ConfigError, "data summary") if summary_file.is_file() else {}
    task = result.get("task", "causal_lm")
    keys = list(HEADLINE[task])
    if "exact_match" in (result.get("baseline") or result.get("final") or {}):
        keys.append("exact_match")
    records = read_metrics(run_dir)
    if plots is None:
        plots = (config.get("metrics") or {}).get("plots", True)
    drawn = plot_curves(run_dir, records, keys, config) if plots else []
    classical_file = run_dir / "classical.json"
    classical = json.loads(classical_file.read_text()) if classical_file.is_file() else None
    ft = config.get("finetune", {})
    model = config.get("model", {}).get("name_or_path") or f"a {config.get('model', {}).get('config', {}).get('model_type', '?')} built from its config"
    objective = (f"Fine-tune {model} for **{task.replace('_', ' ')}** with the **{ft.get('strategy', 'full')}** "
                 f"strategy, and measure the improvement over the baseline (the same model before any "
                 f"update) on the {_evaluated_on(config)}; selection metric: val `{result.get('eval_metric')}`.")
    lines = [
        f"# Run report: {config.get('run', {}).get('name', run_dir.name)}", "",
        "## Objective", "", objective, "",
        "## Result", "", metrics_table(result, keys, classical), "",
        f"Trainable parameters: {result.get('trainable_params', 0):,} of {result.get('total_params', 0):,} "
        f"({100 * result.get('trainable_params', 0) / max(1, result.get('total_params', 1)):.2f}%). "
        f"Steps: {result.get('steps')} ({result.get('stopped_reason')}; budget {_budget(config)}); wall time "
        f"{result.get('wall_seconds', float('nan')):.1f} s; {result.get('tokens_per_s', 0):,.0f} tokens/s.",
    ]
    verdict = classical_verdict(result, classical, result.get("eval_metric") or keys[0])
    if verdict:
        lines.append(verdict)
    if result.get("best_checkpoint"):
        lines.append(f"Best checkpoint: `{result['best_checkpoint']}`.")
    test_conf = (result.get("test") or {}).get("confusion")
    if test_conf and summary.get("labels"):
        from shardtune.eval.metrics import confusion_markdown

        lines += ["", "Test confusion matrix (best checkpoint):", "", confusion_markdown(test_conf, summary["labels"])]
    lines += warnings_section(summary, records)
    lines += _generations_section(records)
    lines += ["", "## Curves", ""] + ([f"![{p}]({p})" for p in drawn] if drawn else
                                      ["Not drawn (metrics.plots=false): `shardtune report` draws them."])
    lines += ["", "## Data", ""] + _data_section(summary)
    lines += ["", "## Config", "", "```yaml", config_text.rstrip(), "```", ""]
    out = run_dir / "report.md"
    out.write_text("\n".join(lines))
    return out
