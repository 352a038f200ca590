"""``shardtune compare RUN_DIR... [--out DIR]``: iterations (or any runs) side by side.

For each run: where it came from (the ``model.name_or_path`` chain: a path inside another run
directory, such as that run's export, names that run, and so on back to a hub model or a
config-built one), its task and data (source, pairs/documents per split), and its validation
metrics at the baseline (the starting model, before the first update), at the end and on the
test split. Everything comes from files the runs wrote (config.yaml, result.json,
data_summary.json), so it works on finished runs from anywhere. Writes ``compare.md`` and
``compare.png`` (one panel per metric the runs share: baseline and final bars per run).

Runs whose validation data differ (another prepared directory, another task) are flagged in the
table: their numbers are then not comparable with each other, only each with its own baseline.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from shardtune.errors import ConfigError

# Shown first, in this order, when a run has them; any other scalar the runs share follows.
PREFERRED = ("loss", "exact_match", "reward_accuracy", "reward_margin", "logp_accuracy", "chosen_logp",
             "rejected_logp", "accuracy", "f1_macro", "perplexity", "token_accuracy")
MAX_METRICS = 8


def add_parser(sub) -> None:
    p = sub.add_parser("compare", help="table and plot of two or more runs: metrics, baseline, data, lineage",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run directories (each with result.json and config.yaml)")
    p.add_argument("--out", default="compare", help="directory for compare.md and compare.png (default ./compare)")


def run(args, extra, parser) -> int:
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    path = write_comparison([Path(r) for r in args.runs], Path(args.out))
    print(path.read_text(), end="")
    return 0


def load_run(run_dir: Path) -> dict:
    result_file, config_file = run_dir / "result.json", run_dir / "config.yaml"
    if not result_file.is_file() or not config_file.is_file():
        raise ConfigError(f"{run_dir} is not a finished shardtune run (no result.json / config.yaml)")
    summary_file = run_dir / "data_summary.json"
    return {"dir": run_dir, "result": json.loads(result_file.read_text()),
            "config": yaml.safe_load(config_file.read_text()),
            "data": json.loads(summary_file.read_text()) if summary_file.is_file() else {}}


def run_of(model_path: str | None) -> Path | None:
    """The run directory a model path lies in (an export ``RUN/hf``, a checkpoint ``RUN/checkpoints/..``)."""
    if not model_path:
        return None
    for parent in [Path(model_path), *Path(model_path).parents]:
        if (parent / "result.json").is_file() and (parent / "config.yaml").is_file():
            return parent
    return None


def lineage(run: dict, limit: int = 10) -> list[str]:
    """This run, the run its starting model came from, and so on: ``[name (dir), ..., origin]``."""
    chain, config, seen = [], run["config"], set()
    here = run["dir"]
    while len(chain) < limit:
        chain.append(f"{config['run']['name']} ({here})")
        source = config["model"].get("name_or_path")
        parent = run_of(source)
        if parent is None or parent.resolve() in seen:
            chain.append(source or f"{config['model']['config'].get('model_type', '?')} built from its config")
            return chain
        seen.add(parent.resolve())
        here, config = parent, yaml.safe_load((parent / "config.yaml").read_text())
    return chain


def _data_line(run: dict) -> str:
    data = run["config"]["data"]
    where = data.get("prepared_dir") if data.get("source") == "prepared" else data.get("path") or data.get("source")
    splits = run["data"].get("splits", {})
    counts = ", ".join(f"{name} {_count(info)}" for name, info in splits.items())
    return f"{where}" + (f" ({counts})" if counts else "")


def _count(info: dict) -> str:
    return str(info.get("pairs", info.get("documents", "?")))


def _metrics(runs: list[dict]) -> list[str]:
    keys: list[str] = []
    for r in runs:
        for part in ("baseline", "final"):
            keys += [k for k in (r["result"].get(part) or {}) if k not in keys]
    ordered = [k for k in PREFERRED if k in keys] + sorted(k for k in keys if k not in PREFERRED and "/" not in k)
    skip = {"tokens", "pairs", "examples"}
    return [k for k in ordered if k not in skip][:MAX_METRICS]


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.4f}"


def comparison_markdown(runs: list[dict]) -> str:
    keys = _metrics(runs)
    lines = ["# Runs compared", ""]
    lines += ["| run | task | starting model | data | steps |", "|---|---|---|---|---|"]
    for r in runs:
        res, cfg = r["result"], r["config"]
        lines.append(f"| {cfg['run']['name']} | {res.get('task')} | {cfg['model'].get('name_or_path') or 'from config'}"
                     f" | {_data_line(r)} | {res.get('steps')} |")
    validation = {(r["config"]["task"], json.dumps(r["config"]["data"].get("prepared_dir"))) for r in runs}
    if len(validation) > 1:
        lines += ["", "**The runs were validated on different data** (task or prepared directory): compare "
                  "each run with its own baseline, not the runs with each other."]
    lines += ["", "## Validation metrics: baseline (starting model) -> final", "",
              "| run | | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for r in runs:
        name = r["config"]["run"]["name"]
        for label, part in (("baseline", "baseline"), ("final", "final"), ("test", "test")):
            metrics = r["result"].get(part)
            if metrics:
                lines.append(f"| {name} | {label} | " + " | ".join(_fmt(metrics.get(k)) for k in keys) + " |")
    lines += ["", "## Lineage (newest first)", ""]
    for r in runs:
        lines.append(f"- {r['config']['run']['name']}: " + " <- ".join(lineage(r)))
    return "\n".join(lines) + "\n"


def plot_comparison(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    keys = _metrics(runs)[:4]
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(4.5 * max(1, len(keys)), 4), squeeze=False)
    names = [r["config"]["run"]["name"] for r in runs]
    x = np.arange(len(runs))
    for ax, key in zip(axes[0], keys, strict=False):
        for offset, part in ((-0.2, "baseline"), (0.2, "final")):
            values = [(r["result"].get(part) or {}).get(key, np.nan) for r in runs]
            ax.bar(x + offset, values, width=0.4, label=part)
        ax.set_xticks(x, names, rotation=20)
        ax.set_title(key)
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_comparison(run_dirs: list[Path], out: Path) -> Path:
    if len(run_dirs) < 2:
        raise ConfigError("shardtune compare needs two or more run directories")
    runs = [load_run(d) for d in run_dirs]
    out.mkdir(parents=True, exist_ok=True)
    text = comparison_markdown(runs) + "\n![baseline and final per run](compare.png)\n"
    plot_comparison(runs, out / "compare.png")
    (out / "compare.md").write_text(text)
    return out / "compare.md"
