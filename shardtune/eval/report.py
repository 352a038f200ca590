"""``report.md`` for a run directory: objective, data, config, baseline vs fine-tuned, plots.

Everything comes from files the run already wrote (config.yaml, data_summary.json,
metrics.jsonl, result.json), so ``shardtune report RUN_DIR`` can (re)build it at any time.
Plots are PNGs drawn with matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

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


def metrics_table(result: dict, keys: list[str]) -> str:
    rows = [("baseline (step 0, before fine-tuning)", result.get("baseline")),
            (f"best validation (step {result.get('best_step')})", result.get("best")),
            (f"final validation (step {result.get('steps')})", result.get("final")),
            ("test (best checkpoint)", result.get("test"))]
    lines = ["| | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name, m in rows:
        if m:
            lines.append(f"| {name} | " + " | ".join(_fmt(m.get(k)) for k in keys) + " |")
    base, best = result.get("baseline") or {}, result.get("best") or result.get("final") or {}
    delta = [_fmt(best[k] - base[k]) if k in best and k in base else "–" for k in keys]
    lines.append("| **improvement (best − baseline)** | " + " | ".join(delta) + " |")
    return "\n".join(lines)


def plot_curves(run_dir: Path, records: list[dict], keys: list[str]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    train = [r for r in records if r["kind"] == "train" and "loss" in r]
    val = [r for r in records if r["kind"] == "val"]
    baseline = next((r for r in records if r["kind"] == "baseline"), None)
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", alpha=0.7)
    if val:
        ax.plot([r["step"] for r in val], [r["loss"] for r in val], "o-", label="validation loss")
    if baseline:
        ax.axhline(baseline["loss"], color="grey", ls="--", label="baseline (validation)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title("Loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(run_dir / "loss.png", dpi=110)
    plt.close(fig)
    written.append("loss.png")
    shown = [k for k in keys if k != "loss" and any(k in r for r in val)]
    # Scores in [0, 1] share one axis; perplexity (unbounded) gets its own.
    panels = [[k for k in shown if k != "perplexity"]] + ([["perplexity"]] if "perplexity" in shown else [])
    panels = [p for p in panels if p]
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4), squeeze=False)
        for ax, panel in zip(axes[0], panels, strict=True):
            for key in panel:
                points = [r for r in val if key in r]  # exact match may be generated at some evaluations only
                line, = ax.plot([r["step"] for r in points], [r[key] for r in points], "o-", label=f"val {key}")
                if baseline and key in baseline:
                    ax.axhline(baseline[key], color=line.get_color(), ls=":", alpha=0.8)
            ax.set_xlabel("optimizer step")
            ax.set_title("Validation metrics (dotted: baseline)")
            ax.legend()
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(run_dir / "metrics.png", dpi=110)
        plt.close(fig)
        written.append("metrics.png")
    return written


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
    truncated = summary.get("truncated")
    if truncated and any(truncated.values()):
        lines.append(f"\nTexts truncated to the sequence length: {truncated}.")
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


def write_report(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    result = json.loads((run_dir / "result.json").read_text())
    config_text = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").is_file() else ""
    config = yaml.safe_load(config_text) if config_text else {}
    summary_file = run_dir / "data_summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    task = result.get("task", "causal_lm")
    keys = list(HEADLINE[task])
    if "exact_match" in (result.get("baseline") or result.get("final") or {}):
        keys.append("exact_match")
    records = read_metrics(run_dir)
    plots = plot_curves(run_dir, records, keys)
    ft = config.get("finetune", {})
    model = config.get("model", {}).get("name_or_path") or f"a {config.get('model', {}).get('config', {}).get('model_type', '?')} built from its config"
    objective = (f"Fine-tune {model} for **{task.replace('_', ' ')}** with the **{ft.get('strategy', 'full')}** "
                 f"strategy, and measure the improvement over the baseline (the same model before any "
                 f"update) on the validation split; selection metric: val `{result.get('eval_metric')}`.")
    lines = [
        f"# Run report: {config.get('run', {}).get('name', run_dir.name)}", "",
        "## Objective", "", objective, "",
        "## Result", "", metrics_table(result, keys), "",
        f"Trainable parameters: {result.get('trainable_params', 0):,} of {result.get('total_params', 0):,} "
        f"({100 * result.get('trainable_params', 0) / max(1, result.get('total_params', 1)):.2f}%). "
        f"Steps: {result.get('steps')} ({result.get('stopped_reason')}); wall time "
        f"{result.get('wall_seconds', float('nan')):.1f} s; {result.get('tokens_per_s', 0):,.0f} tokens/s.",
    ]
    if result.get("best_checkpoint"):
        lines.append(f"Best checkpoint: `{result['best_checkpoint']}`.")
    test_conf = (result.get("test") or {}).get("confusion")
    if test_conf and summary.get("labels"):
        from shardtune.eval.metrics import confusion_markdown

        lines += ["", "Test confusion matrix (best checkpoint):", "", confusion_markdown(test_conf, summary["labels"])]
    lines += _generations_section(records)
    lines += ["", "## Curves", ""] + [f"![{p}]({p})" for p in plots]
    lines += ["", "## Data", ""] + _data_section(summary)
    lines += ["", "## Config", "", "```yaml", config_text.rstrip(), "```", ""]
    out = run_dir / "report.md"
    out.write_text("\n".join(lines))
    return out
