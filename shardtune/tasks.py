"""What a batch means: the forward pass, the loss and the evaluation statistics per task.

The loop and the evaluator only see this interface, so they stay the same for causal-LM
fine-tuning (packed sequences, loss on target tokens) and sequence classification (one
padded text per row, one label per row). Losses are sums over targets: the loop divides by
the step's global target count itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shardtune.data.packing import IGNORE_INDEX


def count_loss_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


class CausalLMTask:
    name = "causal_lm"

    def __init__(self, label_smoothing: float = 0.0):
        self.label_smoothing = label_smoothing

    def count_targets(self, batch: dict[str, torch.Tensor]) -> int:
        return count_loss_tokens(batch)

    def logits(self, model, batch, device) -> torch.Tensor:
        input_ids = batch["input_ids"].to(device, non_blocking=True)
        position_ids = batch["position_ids"].to(device, non_blocking=True)
        # No attention_mask: the per-document position_ids make the mask block-diagonal.
        return model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits

    def loss_from_logits(self, logits, batch, device, smoothing: float = 0.0) -> torch.Tensor:
        labels = batch["labels"].to(device, non_blocking=True)
        return F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
            ignore_index=IGNORE_INDEX, reduction="sum", label_smoothing=smoothing,
        )

    def loss_sum(self, model, batch, device) -> torch.Tensor:
        """Training loss (with label smoothing), summed over target tokens."""
        return self.loss_from_logits(self.logits(model, batch, device), batch, device, self.label_smoothing)

    def eval_stats(self, logits, batch, device) -> dict[str, torch.Tensor]:
        """Sums for one batch (this rank); the evaluator all-reduces them."""
        labels = batch["labels"].to(device)[:, 1:]
        mask = labels != IGNORE_INDEX
        correct = (logits[:, :-1].argmax(-1) == labels) & mask
        return {
            "loss_sum": self.loss_from_logits(logits, batch, device).double(),
            "targets": mask.sum().double(),
            "correct": correct.sum().double(),
        }


class ClassificationTask:
    name = "classification"

    def __init__(self, num_labels: int, label_smoothing: float = 0.0):
        self.num_labels = num_labels
        self.label_smoothing = label_smoothing

    def count_targets(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def logits(self, model, batch, device) -> torch.Tensor:
        return model(
            input_ids=batch["input_ids"].to(device, non_blocking=True),
            attention_mask=batch["attention_mask"].to(device, non_blocking=True),
        ).logits

    def loss_from_logits(self, logits, batch, device, smoothing: float = 0.0) -> torch.Tensor:
        labels = batch["labels"].to(device, non_blocking=True)
        return F.cross_entropy(
            logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum", label_smoothing=smoothing
        )

    def loss_sum(self, model, batch, device) -> torch.Tensor:
        return self.loss_from_logits(self.logits(model, batch, device), batch, device, self.label_smoothing)

    def eval_stats(self, logits, batch, device) -> dict[str, torch.Tensor]:
        labels = batch["labels"].to(device)
        keep = labels != IGNORE_INDEX
        pred = logits.argmax(-1)
        n = self.num_labels
        # Confusion matrix, rows = true label, columns = prediction.
        index = labels[keep] * n + pred[keep]
        confusion = torch.bincount(index, minlength=n * n).double()
        return {
            "loss_sum": self.loss_from_logits(logits, batch, device).double(),
            "targets": keep.sum().double(),
            "confusion": confusion,
        }


def build_task(cfg, num_labels: int | None = None):
    smoothing = cfg.finetune.label_smoothing
    if cfg.task == "preference":
        from shardtune.preference import PreferenceTask

        return PreferenceTask(**cfg.finetune.preference.model_dump())
    if cfg.task == "classification":
        if not num_labels:
            raise ValueError("task=classification needs labelled data (num_labels is unknown)")
        return ClassificationTask(num_labels, smoothing)
    return CausalLMTask(smoothing)
