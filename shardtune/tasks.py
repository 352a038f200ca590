"""What a batch means: the forward pass, the loss and the evaluation statistics per task.

The loop and the evaluator only see this interface, so they stay the same for causal-LM
fine-tuning (packed sequences, loss on target tokens) and sequence classification (one
padded text per row, one label per row). Losses are sums over targets: the loop divides by
the step's global target count itself.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from shardtune.data.packing import IGNORE_INDEX


def count_loss_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


# Model families whose causal-LM forward is `logits = self.lm_head(hidden)` with nothing after
# it (no soft-capping, no logit scale): for them the head module may return the loss instead.
# Others (Gemma's soft-capping, Cohere's logit_scale, ...) keep the full-logits path.
SELECTIVE_HEAD_MODELS = frozenset({"llama", "mistral", "qwen2", "qwen3", "smollm3", "phi3", "gpt2"})
# Logits of at most this many elements exist at once (32 MiB in fp32): ~170 positions of a
# 49k vocabulary per chunk, enough rows that the matmul stays efficient.
CHUNK_ELEMENTS = 1 << 23
_PENDING = "_shardtune_loss_targets"


class _TargetCrossEntropy(torch.autograd.Function):
    """Sum of cross-entropies at ``index`` (flat positions of ``hidden``), chunk by chunk.

    Each chunk's logits are built, differentiated and freed inside forward, so no more than
    one chunk of logits ever exists, and backward only scales the gradients forward kept.
    The inner graph runs on detached aliases of the weight: the strategies' gradient hooks
    (DDP buckets, FSDP2 reduce-scatter, ZeRO partitions) see one gradient, from backward.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, index, targets, smoothing: float, chunk: int):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)
        w = weight.detach().requires_grad_(need_w)
        b = bias.detach().requires_grad_(need_b) if bias is not None else None
        grad_picked = torch.empty_like(picked) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros_like(bias) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, picked.shape[0], chunk):
            rows = slice(start, start + chunk)
            h = picked[rows].detach().requires_grad_(need_h)
            with torch.enable_grad():
                logits = F.linear(h, w, b)
                loss = F.cross_entropy(logits.float(), targets[rows], reduction="sum", label_smoothing=smoothing)
            wrt = [t for t, needed in ((h, need_h), (w, need_w), (b, need_b)) if needed]
            if wrt:
                grads = list(torch.autograd.grad(loss, wrt))
                if need_h:
                    grad_picked[rows] = grads.pop(0)
                if need_w:
                    grad_w += grads.pop(0)
                if need_b:
                    grad_b += grads.pop(0)
            total += loss.detach()
        grad_hidden = None
        if need_h:
            flat = torch.zeros(hidden.numel() // hidden.shape[-1], hidden.shape[-1], dtype=hidden.dtype,
                               device=hidden.device)
            grad_hidden = flat.index_copy_(0, index, grad_picked.to(hidden.dtype)).view_as(hidden)
        ctx.grads = (grad_hidden, grad_w, grad_b)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grads, ctx.grads = ctx.grads, None
        scaled = [None if g is None else g * grad_total.to(g.dtype) for g in grads]
        return (*scaled, None, None, None, None)


def _head_loss(head: torch.nn.Linear, index, targets, smoothing: float, hidden: torch.Tensor) -> torch.Tensor:
    """Stands in for ``head.forward`` for one call: the loss at the target positions."""
    chunk = max(1, CHUNK_ELEMENTS // head.out_features)
    return _TargetCrossEntropy.apply(hidden, head.weight, head.bias, index, targets, smoothing, chunk)


def selective_head(model) -> torch.nn.Linear | None:
    """The output projection, when the loss may be computed inside it (see ``SELECTIVE_HEAD_MODELS``)."""
    inner = getattr(model, "module", model)  # DDP and DeepSpeed wrap the model; FSDP2 does not
    model_type = getattr(getattr(inner, "config", None), "model_type", None)
    if model_type not in SELECTIVE_HEAD_MODELS or not hasattr(inner, "get_output_embeddings"):
        return None
    head = inner.get_output_embeddings()
    # Exactly nn.Linear: a LoRA-wrapped or quantised head computes something else from its weight.
    return head if type(head) is torch.nn.Linear else None


class CausalLMTask:
    """``loss_sum`` scores only the positions that carry a loss.

    In assistant-only SFT most positions (prompts, user turns, padding) have label -100, yet
    the plain path sends every one through the LM head and the cross-entropy. Here the head
    module, for the duration of one forward, returns the loss over the target positions
    instead of logits: the model (and DDP, FSDP2 or DeepSpeed around it) runs unchanged,
    the head is called inside the model's forward, so FSDP2's unsharded root parameters and
    ZeRO-3's per-module gathers are in place, and a tied embedding is one weight receiving
    both gradients. Evaluation and generation call ``logits`` and see the plain head.
    """

    name = "causal_lm"

    def __init__(self, label_smoothing: float = 0.0, selective: bool = True):
        self.label_smoothing = label_smoothing
        self.selective = selective  # False: every position through the head (the reference path)

    def count_targets(self, batch: dict[str, torch.Tensor]) -> int:
        return count_loss_tokens(batch)

    def head_on_targets_only(self, model) -> torch.nn.Linear | None:
        """The output projection when training runs it on the loss positions only, else None."""
        return selective_head(model) if self.selective else None

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
        head = self.head_on_targets_only(model)
        if head is None:
            return self.loss_from_logits(self.logits(model, batch, device), batch, device, self.label_smoothing)
        labels = batch["labels"].to(device, non_blocking=True)
        shifted = labels[:, 1:]  # hidden state (b, t) predicts label (b, t + 1)
        rows, cols = (shifted != IGNORE_INDEX).nonzero(as_tuple=True)
        index = rows * labels.shape[1] + cols
        head.forward = functools.partial(_head_loss, head, index, shifted[rows, cols], self.label_smoothing)
        try:
            return self.logits(model, batch, device)  # the head's output: the loss sum
        finally:
            del head.forward  # back to the class's forward

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
    # A whole-model torch.compile would trace the swapped head forward into its graph.
    return CausalLMTask(smoothing, selective=cfg.train.compile != "model")
