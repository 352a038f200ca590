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
    """Token-mean metrics. No scored token (every target cut off by ``data.seq_len``, or an
    empty split) gives NaN: a loss of 0.0 would read as a perfect model and be kept as best."""
    if targets <= 0:
        return {"loss": math.nan, "perplexity": math.nan, "token_accuracy": math.nan, "tokens": 0.0}
    mean = loss_sum / targets
    return {
        "loss": mean,
        "perplexity": math.exp(min(mean, 50.0)),
        "token_accuracy": correct / targets,
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


# ---- generated answers vs references (strings already normalised by eval.generate) --------

GENERATION_METRICS = ("exact_match", "token_f1", "rouge_l")


def token_f1(prediction_tokens: list[str], reference_tokens: list[str]) -> float:
    """SQuAD's token F1: the bag-of-tokens overlap (with multiplicity) as an F1 score.

    Two empty answers agree (1.0); an empty answer against a non-empty one scores 0.
    """
    if not prediction_tokens or not reference_tokens:
        return float(prediction_tokens == reference_tokens)
    from collections import Counter

    common = sum((Counter(prediction_tokens) & Counter(reference_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(prediction_tokens), common / len(reference_tokens)
    return 2 * precision * recall / (precision + recall)


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence (one row of the DP table at a time)."""
    if len(b) > len(a):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0
        for j, y in enumerate(b, start=1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(prediction_tokens: list[str], reference_tokens: list[str]) -> float:
    """ROUGE-L F1 (beta = 1): precision and recall of the longest common subsequence of tokens."""
    if not prediction_tokens or not reference_tokens:
        return float(prediction_tokens == reference_tokens)
    lcs = lcs_length(prediction_tokens, reference_tokens)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(prediction_tokens), lcs / len(reference_tokens)
    return 2 * precision * recall / (precision + recall)
