"""Metrics from reduced counts: classification scores from a confusion matrix, LM scores from sums.

Ranks only ever all-reduce sums (a confusion matrix, loss and target counts), so the
metrics are exactly those of the whole split, whatever the split across ranks.
"""

from __future__ import annotations

import math

import numpy as np


def classification_metrics(confusion: np.ndarray, label_names: list[str] | None = None) -> dict[str, float]:
    """Accuracy, macro precision/recall/F1 and per-class scores.

    ``confusion[i, j]`` counts examples of true class ``i`` predicted as ``j``. A class with
    no predictions (or no examples) scores 0 for precision (recall), as scikit-learn does
    with ``zero_division=0``; macro averages are over all classes.
    """
    c = np.asarray(confusion, dtype=np.float64)
    n = c.shape[0]
    names = label_names or [str(i) for i in range(n)]
    tp = np.diag(c)
    predicted = c.sum(axis=0)
    actual = c.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros(n), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros(n), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(n), where=denom > 0)
    total = c.sum()
    out = {
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "precision_macro": float(precision.mean()),
        "recall_macro": float(recall.mean()),
        "f1_macro": float(f1.mean()),
        "examples": float(total),
    }
    for i, name in enumerate(names):
        out[f"precision/{name}"] = float(precision[i])
        out[f"recall/{name}"] = float(recall[i])
        out[f"f1/{name}"] = float(f1[i])
    return out


def language_model_metrics(loss_sum: float, targets: float, correct: float) -> dict[str, float]:
    mean = loss_sum / max(targets, 1.0)
    return {
        "loss": mean,
        "perplexity": math.exp(min(mean, 50.0)),
        "token_accuracy": correct / max(targets, 1.0),
        "tokens": targets,
    }


def confusion_markdown(confusion, label_names: list[str]) -> str:
    """A confusion matrix as a markdown table (rows: true label, columns: predicted)."""
    c = np.asarray(confusion, dtype=np.int64)
    lines = ["| true \\ predicted | " + " | ".join(label_names) + " |",
             "|---|" + "---|" * len(label_names)]
    for name, row in zip(label_names, c, strict=True):
        lines.append(f"| **{name}** | " + " | ".join(str(int(v)) for v in row) + " |")
    return "\n".join(lines)
