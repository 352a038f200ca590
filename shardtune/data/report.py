"""Accounting for ``shardtune data prepare``: every record read is kept or dropped for a reason."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

MAX_EXAMPLES = 5


class AccountingError(AssertionError):
    """read != kept + dropped: a record vanished without a reason. Always a bug."""


class Accounting:
    def __init__(self, splits: tuple[str, ...]):
        self.read = 0
        self.dropped: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}
        self.kept = {s: 0 for s in splits}
        self.tokens = {s: 0 for s in splits}
        self.target_tokens = {s: 0 for s in splits}
        self.lengths: dict[str, list[int]] = {s: [] for s in splits}
        self.truncated = 0

    def drop(self, reason: str, location: str, detail: str = "") -> None:
        self.dropped[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < MAX_EXAMPLES:
            examples.append(f"{location} ({detail})" if detail else location)

    def keep(self, split: str, num_tokens: int, num_targets: int) -> None:
        self.kept[split] += 1
        self.tokens[split] += num_tokens
        self.target_tokens[split] += num_targets
        self.lengths[split].append(num_tokens)

    def check(self) -> None:
        kept, dropped = sum(self.kept.values()), sum(self.dropped.values())
        if self.read != kept + dropped:
            raise AccountingError(f"records read ({self.read}) != kept ({kept}) + dropped ({dropped})")

    def to_dict(self) -> dict:
        self.check()
        return {
            "records_read": self.read,
            "records_kept": sum(self.kept.values()),
            "records_dropped": sum(self.dropped.values()),
            "kept_truncated": self.truncated,
            "dropped_by_reason": dict(sorted(self.dropped.items())),
            "drop_examples": {k: self.examples[k] for k in sorted(self.examples)},
            "splits": {
                s: {
                    "documents": self.kept[s],
                    "tokens": self.tokens[s],
                    "target_tokens": self.target_tokens[s],
                    **_length_stats(self.lengths[s]),
                }
                for s in self.kept
            },
        }


def _length_stats(lengths: list[int]) -> dict:
    if not lengths:
        return {}
    arr = np.asarray(lengths)
    return {
        "length_min": int(arr.min()),
        "length_median": float(np.median(arr)),
        "length_p99": float(np.percentile(arr, 99)),
        "length_max": int(arr.max()),
    }


def format_table(report: dict) -> str:
    rows = [("records read", report["records_read"], "")]
    rows.append(("kept", report["records_kept"], f"{report['kept_truncated']} truncated"))
    for split, info in report["splits"].items():
        rows.append((f"  {split}", info["documents"], f"{info['tokens']:,} tokens, {info['target_tokens']:,} in the loss"))
    rows.append(("dropped", report["records_dropped"], ""))
    for reason, count in report["dropped_by_reason"].items():
        rows.append((f"  {reason}", count, "e.g. " + ", ".join(report["drop_examples"][reason][:3])))
    width = max(len(r[0]) for r in rows)
    lines = [f"{name:<{width}}  {count:>9,}  {note}".rstrip() for name, count, note in rows]
    return "\n".join(lines) + "\n"


def plot_length_histogram(lengths: dict[str, list[int]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    nonempty = {s: v for s, v in lengths.items() if v}
    if nonempty:
        upper = max(max(v) for v in nonempty.values())
        bins = np.linspace(0, upper + 1, 50)
        for split, values in nonempty.items():
            ax.hist(values, bins=bins, alpha=0.6, label=f"{split} ({len(values):,})")
        ax.legend()
    ax.set_xlabel("tokens per document")
    ax.set_ylabel("documents")
    ax.set_title("Token length distribution")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(accounting: Accounting, out_dir: Path) -> dict:
    report = accounting.to_dict()
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "report.txt").write_text(format_table(report))
    plot_length_histogram(accounting.lengths, out_dir / "token_lengths.png")
    return report
