"""Evaluation during a run: baseline, every ``eval.every`` steps, best checkpoint, early stopping, test.

All ranks evaluate (their shares) and receive identical reduced metrics; rank 0 alone
writes them (the logger is a no-op elsewhere). The improve/stop decision is rank 0's,
broadcast, so every rank saves and stops at the same step even if floating-point
reductions were ever to differ.

TensorBoard tags: ``val/<metric>`` at every evaluation (step 0 is the baseline: the
pre-trained model before any update), ``baseline/<metric>`` once at step 0, ``test/<metric>``
once at the end (best checkpoint), and a ``summary`` text table of baseline vs fine-tuned.
"""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist

from shardtune.eval.evaluate import evaluate, scalars
from shardtune.eval.metrics import confusion_markdown


class EvalTracker:
    def __init__(self, cfg, ctx, strategy, parts, log):
        self.cfg, self.ctx, self.strategy, self.log = cfg, ctx, strategy, log
        self.task = parts.task
        self.label_names = parts.data.label_names if parts.data else None
        self.val = parts.val_source.epoch(0)
        self.test_source = parts.data.test if parts.data else None
        self.metric, self.mode = cfg.eval_metric, cfg.eval_mode
        self.kwargs = dict(
            micro_batch_size=cfg.train.micro_batch_size, rank=ctx.rank, world_size=ctx.world_size,
            max_batches=cfg.eval.batches or cfg.train.eval_batches, label_names=self.label_names,
        )
        self.baseline: dict | None = None
        self.latest: dict | None = None
        self.best: dict | None = None
        self.best_step: int | None = None
        self.bad_evals = 0
        self.last_step: int | None = None
        self.seconds = 0.0  # time spent evaluating (the loop excludes it from throughput)
        self.history: list[dict] = []

    # -- scheduling ------------------------------------------------------------------------

    def due(self, step: int, total_steps: int) -> bool:
        every = self.cfg.eval.every
        return step == total_steps or bool(every and step % every == 0)

    # -- evaluations -----------------------------------------------------------------------

    def run(self, sequences) -> dict:
        start = time.perf_counter()
        metrics = evaluate(self.strategy, self.task, sequences, **self.kwargs)
        self.seconds += time.perf_counter() - start
        return metrics

    def evaluate_baseline(self, step: int) -> dict:
        """Before the first update (a resumed run evaluates too, but has no baseline)."""
        metrics = self.evaluate(step, track=False)
        if step == 0:
            self.baseline = metrics
            self.log.log(0, scalars(metrics), kind="baseline")
        return metrics

    def evaluate(self, step: int, track: bool = True) -> dict:
        """Validation metrics at ``step``; returns them with ``improved`` and ``stop`` decided."""
        metrics = self.run(self.val)
        self.latest, self.last_step = metrics, step
        extra = {"confusion": metrics["confusion"]} if "confusion" in metrics else None
        self.log.log(step, scalars(metrics), kind="val", extra=extra)
        if "confusion" in metrics:
            self.log.text("val/confusion_matrix", confusion_markdown(metrics["confusion"], self.label_names), step)
        improved = stop = False
        if track:
            improved = self._better(metrics)
            if improved:
                self.best, self.best_step, self.bad_evals = metrics, step, 0
            else:
                self.bad_evals += 1
            patience = self.cfg.eval.patience
            stop = patience is not None and self.bad_evals >= patience
            improved, stop = self._agree(improved, stop)
        self.history.append({"step": step, self.metric: metrics.get(self.metric)})
        metrics = dict(metrics, improved=improved, stop=stop)
        return metrics

    def _better(self, metrics: dict) -> bool:
        if self.metric not in metrics:
            raise KeyError(f"eval.metric={self.metric!r} is not computed; choose one of {sorted(scalars(metrics))}")
        value = metrics[self.metric]
        if self.best is None:
            return not math.isnan(value)
        best = self.best[self.metric]
        delta = self.cfg.eval.min_delta
        return value < best - delta if self.mode == "min" else value > best + delta

    def _agree(self, improved: bool, stop: bool) -> tuple[bool, bool]:
        flags = torch.tensor([float(improved), float(stop)], dtype=torch.float64, device=self.ctx.device)
        dist.broadcast(flags, src=0)
        return bool(flags[0].item()), bool(flags[1].item())

    def evaluate_test(self, step: int) -> dict | None:
        if self.test_source is None or not self.cfg.eval.test_at_end:
            return None
        metrics = self.run(self.test_source.epoch(0))
        extra = {"confusion": metrics["confusion"]} if "confusion" in metrics else None
        self.log.log(step, scalars(metrics), kind="test", extra=extra)
        return metrics

    def write_summary(self, step: int, test: dict | None) -> None:
        """A baseline / best / final / test table as TensorBoard text."""
        rows = [("baseline (step 0)", self.baseline), (f"best (step {self.best_step})", self.best),
                (f"final (step {self.last_step})", self.latest), ("test (best checkpoint)", test)]
        keys = [k for k in ("loss", "perplexity", "token_accuracy", "accuracy", "f1_macro",
                            "precision_macro", "recall_macro") if self.latest and k in self.latest]
        lines = ["| | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for name, m in rows:
            if m:
                lines.append(f"| {name} | " + " | ".join(f"{m[k]:.4f}" for k in keys) + " |")
        self.log.text("summary", "\n".join(lines), step)
