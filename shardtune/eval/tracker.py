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

import json
import math
import sys
import time

import torch
import torch.distributed as dist

from shardtune.errors import DataError
from shardtune.eval.evaluate import evaluate, preserved_rng, scalars
from shardtune.eval.generate import evaluate_generation, generation_samples
from shardtune.eval.metrics import confusion_markdown
from shardtune.eval.truncation import truncation_record, warning_lines

# Early-stopping state kept in checkpoints (trainer_state.json, key "eval"): a resumed run
# continues the patience count and keeps its baseline and best instead of starting afresh.
_STATE_KEYS = ("baseline", "latest", "best", "best_step", "bad_evals", "last_step", "history", "best_checkpoint")


class EvalTracker:
    def __init__(self, cfg, ctx, strategy, parts, log):
        self.cfg, self.ctx, self.strategy, self.log = cfg, ctx, strategy, log
        self.task = parts.task
        self.label_names = parts.data.label_names if parts.data else None
        self.data = parts.data
        self.val_source = _evaluation_source(cfg, parts)
        self.val = self.val_source.epoch(0)
        self.test_source = parts.data.test if parts.data else None
        self.metric, self.mode = cfg.eval_metric, cfg.eval_mode
        self.kwargs = dict(
            micro_batch_size=cfg.train.micro_batch_size, rank=ctx.rank, world_size=ctx.world_size,
            max_batches=cfg.eval.batches, label_names=self.label_names,
        )
        # The test split is evaluated once, at the end: all of it unless eval.test_batches says otherwise.
        self.test_kwargs = dict(self.kwargs, max_batches=cfg.eval.test_batches)
        self._noted: set[str] = set()  # splits whose truncation counts were logged
        self.baseline: dict | None = None
        self.latest: dict | None = None
        self.best: dict | None = None
        self.best_step: int | None = None
        self.bad_evals = 0
        self.last_step: int | None = None
        self.best_checkpoint: str | None = None  # set by the loop when it saves the best step
        self.seconds = 0.0  # time spent evaluating (the loop excludes it from throughput)
        self.history: list[dict] = []
        self.total_steps = parts.total_steps
        self.gen = cfg.eval.generate
        self.tokenizer = parts.tokenizer
        self._samples: dict[str, list] = {}

    # -- resumable state -------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Plain JSON: metrics are scalar dicts (plus a confusion matrix as nested lists)."""
        # A copy: an asynchronous save serialises it later, while evaluations go on.
        return json.loads(json.dumps({k: getattr(self, k) for k in _STATE_KEYS}))

    def load_state_dict(self, state: dict) -> None:
        for key in _STATE_KEYS:
            if key in state:
                setattr(self, key, state[key])

    # -- scheduling ------------------------------------------------------------------------

    def due(self, step: int, total_steps: int) -> bool:
        every = self.cfg.eval.every
        return step == total_steps or bool(every and step % every == 0)

    # -- evaluations -----------------------------------------------------------------------

    def run(self, sequences, split: str = "validation", source=None, generate: bool = False) -> dict:
        start = time.perf_counter()
        metrics = evaluate(self.strategy, self.task, sequences, **(self.test_kwargs if split == "test" else self.kwargs))
        if generate and self.gen.samples:
            if split not in self._samples:
                max_prompt = max(1, self.cfg.data.seq_len - self.gen.max_new_tokens)
                self._samples[split] = generation_samples(source, self.gen.samples, max_prompt)
            with preserved_rng():
                metrics.update(evaluate_generation(
                    self.strategy, self.tokenizer, self._samples[split],
                    micro_batch_size=self.gen.micro_batch_size or self.cfg.train.micro_batch_size,
                    max_new_tokens=self.gen.max_new_tokens, rank=self.ctx.rank,
                    world_size=self.ctx.world_size, examples=self.gen.examples,
                ))
        if split not in self._noted:
            self._noted.add(split)
            self._note_truncation(split, source if source is not None else self.val_source)
            if metrics.get("tokens") == 0 and self.ctx.is_main:
                print(f"shardtune: warning: the {split} evaluation scored no token (every target is past "
                      f"data.seq_len={self.cfg.data.seq_len}, or eval.batches holds none): its loss is NaN",
                      file=sys.stderr, flush=True)
        self.seconds += time.perf_counter() - start
        return metrics

    def _note_truncation(self, split: str, source) -> None:
        """Rank 0: count documents longer than seq_len and answers longer than max_new_tokens; warn, log."""
        if not self.ctx.is_main:
            return
        eos = {self.tokenizer.eos_token_id} if getattr(self.tokenizer, "eos_token_id", None) is not None else set()
        record = truncation_record(split, source, self.cfg.data.seq_len, self._samples.get(split),
                                   self.gen.max_new_tokens, eos)
        if record is None:
            return
        for line in warning_lines(split, record):
            print(f"shardtune: warning: {line}", file=sys.stderr, flush=True)
        self.log.log(self.last_step or 0, record, kind="truncation", extra={"split": split})

    def classical_reference(self) -> None:
        """classification: TF-IDF + logistic regression on the same splits (rank 0), to classical.json."""
        if self.cfg.task != "classification" or not self.cfg.eval.classical or not self.ctx.is_main:
            return
        path = self.cfg.output_dir / "classical.json"
        if path.is_file() or self.data is None:  # a resumed run has it already
            return
        from shardtune.eval.classical import classical_reference

        splits = {"validation": self.val_source.examples}
        if self.test_source is not None:
            splits["test"] = self.test_source.examples
        reference = classical_reference(self.data.train.examples, splits, self.tokenizer, self.label_names)
        path.write_text(json.dumps(reference, indent=1) + "\n")
        for split in splits:
            self.log.log(0, scalars(reference[split]), kind=f"classical_{split}")

    def _generate_at(self, step: int) -> bool:
        return bool(self.gen.samples) and (self.gen.every_eval or step in (0, self.total_steps))

    def _extra(self, metrics: dict, kind: str, step: int) -> dict | None:
        extra = {}
        if "confusion" in metrics:
            extra["confusion"] = metrics["confusion"]
            self.log.text(f"{kind}/confusion_matrix", confusion_markdown(metrics["confusion"], self.label_names), step)
        if metrics.get("generations"):
            extra["generations"] = metrics["generations"]
            rows = ["| prompt (end) | reference | generated | match |", "|---|---|---|---|"]
            rows += [f"| {_cell(e['prompt'][-60:])} | {_cell(e['reference'])} | {_cell(e['generated'])} | "
                     f"{'yes' if e['match'] else 'no'} |" for e in metrics["generations"]]
            self.log.text(f"{kind}/generations", "\n".join(rows), step)
        return extra or None

    def evaluate_baseline(self, step: int) -> dict:
        """Before the first update. A resumed run whose checkpoint holds the evaluation state
        has its baseline already and skips this; an older checkpoint evaluates without one."""
        if step > 0 and self.baseline is not None:
            return self.baseline
        if step == 0:
            self.classical_reference()  # before the baseline: the others wait in its collectives
        metrics = self.evaluate(step, track=False)
        if step == 0:
            self.baseline = scalars(metrics)
            self.log.log(0, scalars(metrics), kind="baseline")
        return metrics

    def evaluate(self, step: int, track: bool = True) -> dict:
        """Validation metrics at ``step``; returns them with ``improved`` and ``stop`` decided."""
        metrics = self.run(self.val, "validation", self.val_source, generate=self._generate_at(step))
        self.latest, self.last_step = _plain(metrics), step
        self.log.log(step, scalars(metrics), kind="val", extra=self._extra(metrics, "val", step))
        improved = stop = False
        if track:
            improved = self._better(metrics)
            if improved:
                self.best, self.best_step, self.bad_evals = _plain(metrics), step, 0
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
        if value == best and self.metric != "loss" and "loss" in metrics and "loss" in self.best:
            # Generated-answer scores over a few dozen prompts tie often (1.0 and 1.0): the
            # checkpoint with the lower validation loss is the better one then.
            return metrics["loss"] < self.best["loss"]
        return value < best - delta if self.mode == "min" else value > best + delta

    def _agree(self, improved: bool, stop: bool) -> tuple[bool, bool]:
        flags = torch.tensor([float(improved), float(stop)], dtype=torch.float64, device=self.ctx.device)
        dist.broadcast(flags, src=0)
        return bool(flags[0].item()), bool(flags[1].item())

    def evaluate_test(self, step: int) -> dict | None:
        if self.test_source is None or not self.cfg.eval.test_at_end:
            return None
        metrics = self.run(self.test_source.epoch(0), "test", self.test_source, generate=bool(self.gen.samples))
        self.log.log(step, scalars(metrics), kind="test", extra=self._extra(metrics, "test", step))
        return metrics

    def write_summary(self, step: int, test: dict | None) -> None:
        """A baseline / best / final / test table as TensorBoard text."""
        rows = [("baseline (step 0)", self.baseline), (f"best (step {self.best_step})", self.best),
                (f"final (step {self.last_step})", self.latest), ("test (best checkpoint)", test)]
        keys = [k for k in ("loss", "perplexity", "token_accuracy", "exact_match", "token_f1", "rouge_l",
                            "accuracy", "f1_macro",
                            "precision_macro", "recall_macro") if self.latest and k in self.latest]
        lines = ["| | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for name, m in rows:
            if m:
                lines.append(f"| {name} | " + " | ".join(f"{m[k]:.4f}" if k in m else "–" for k in keys) + " |")
        self.log.text("summary", "\n".join(lines), step)


def _evaluation_source(cfg, parts):
    """The split evaluations run on: validation, or (eval.split=train, said in the report) training data.

    Data without a validation split used to be evaluated on its training split in silence.
    """
    if cfg.eval.split == "train":
        train = parts.train_source
        examples = getattr(train, "examples", None)
        if examples is not None:  # classification: the rows in file order, like a validation split
            return type(train)(examples, train.seed, shuffle=False)
        return train
    splits = (parts.data.summary.get("splits") if parts.data else None) or {}
    if splits and not (splits.get("validation") or {}).get("documents"):
        raise DataError(
            "the data has no validation split, so there is nothing to evaluate on: give it one "
            "(data.prepare.splits.validation), or set "
            "eval.split=train to evaluate on the training data (the report says so)"
        )
    return parts.val_source


def _plain(metrics: dict) -> dict:
    """What the tracker keeps (and checkpoints): scalars and the confusion matrix, no examples."""
    return {k: v for k, v in metrics.items() if k != "generations"}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
