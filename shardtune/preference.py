"""Preference tuning: the DPO / IPO losses, the task the loop and the evaluator see, the reference pass.

A batch holds pairs: ``input_ids`` and ``labels`` of shape [pairs, 2, seq_len] (row 0 the chosen
response, row 1 the rejected one, both after the same prompt tokens; labels -100 outside the
response) and ``ref_logps`` [pairs, 2], the reference model's summed response log-probabilities.
Those come from one no-grad pass over the split before the first update
(``reference_logps``), stored per pair id with the data, so no reference model stays in memory
and a resumed run reads the same numbers instead of recomputing them with trained weights.

With h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)) per pair:

* ``dpo`` (sigmoid, Rafailov et al. 2023): -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h),
  eps = label smoothing (the "conservative DPO" of noisy labels; 0 = plain DPO);
* ``ipo`` (Azar et al. 2023): (h - 1 / (2 beta))^2, with log-probabilities averaged over each
  response's tokens (as TRL does: a squared loss on summed log-probs would scale with length).

Losses are sums over pairs: the loop divides by the step's global pair count, so the gradient is
the global per-pair mean whatever the split over ranks and micro-batches, exactly as the SFT loss
is the global per-token mean. Rewards are beta (log pi - log ref).
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from shardtune.errors import CheckpointError

IGNORE_INDEX = -100  # the labels convention of data.packing (L2; not importable from here)
LOSSES = ("dpo", "ipo")


def dpo_loss(h: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair sigmoid DPO loss from the log-ratio difference ``h``."""
    return -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)


def ipo_loss(h: torch.Tensor, beta: float) -> torch.Tensor:
    return (h - 1.0 / (2.0 * beta)) ** 2


def response_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of each row's target tokens, their count); rows = [N, L]."""
    targets = labels[:, 1:]
    nll = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(targets.shape)
    return -nll.sum(-1), (targets != IGNORE_INDEX).sum(-1)


def _trimmed_rows(batch: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
    """[pairs, 2, L] -> [2 * pairs, L'], cut after the longest row: padding is at the end and the
    model is causal, so the cut changes nothing but the work."""
    ids = batch["input_ids"].flatten(0, 1)
    labels = batch["labels"].flatten(0, 1)
    length = int(batch["lengths"].max())
    return (ids[:, :length].to(device, non_blocking=True), labels[:, :length].to(device, non_blocking=True))


class PreferenceTask:
    name = "preference"

    def __init__(self, loss: str = "dpo", beta: float = 0.1, label_smoothing: float = 0.0):
        if loss not in LOSSES:
            raise ValueError(f"finetune.preference.loss={loss!r} is not one of {', '.join(LOSSES)}")
        if loss == "ipo" and label_smoothing:
            raise ValueError("finetune.preference.label_smoothing applies to loss=dpo only")
        self.loss, self.beta, self.label_smoothing = loss, beta, label_smoothing

    def count_targets(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["input_ids"].shape[0])  # pairs

    def logits(self, model, batch, device) -> torch.Tensor:
        ids, _ = _trimmed_rows(batch, device)
        return model(input_ids=ids, use_cache=False).logits

    def pair_logps(self, logits, batch, device) -> tuple[torch.Tensor, torch.Tensor]:
        """[pairs, 2] summed response log-probs of the policy, and [pairs, 2] token counts."""
        _, labels = _trimmed_rows(batch, device)
        logps, counts = response_logps(logits, labels)
        return logps.view(-1, 2), counts.view(-1, 2)

    def losses(self, logps, counts, ref) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-pair loss, per-pair h) in float64 for the reduction's sake."""
        logps, ref = logps.double(), ref.double()
        if torch.isnan(ref).any():
            raise RuntimeError("a batch has no reference log-probabilities: the reference pass did not run")
        if self.loss == "ipo":
            per_token = counts.clamp(min=1).double()
            h = ((logps - ref) / per_token) @ torch.tensor([1.0, -1.0], dtype=torch.float64, device=logps.device)
            return ipo_loss(h, self.beta), h
        h = (logps - ref) @ torch.tensor([1.0, -1.0], dtype=torch.float64, device=logps.device)
        return dpo_loss(h, self.beta, self.label_smoothing), h

    def loss_sum(self, model, batch, device) -> torch.Tensor:
        logps, counts = self.pair_logps(self.logits(model, batch, device), batch, device)
        loss, _ = self.losses(logps, counts, batch["ref_logps"].to(device))
        return loss.sum()

    def eval_stats(self, logits, batch, device) -> dict[str, torch.Tensor]:
        """Sums for one batch (this rank); ``metrics_from_sums`` turns the all-reduced sums into metrics."""
        logps, counts = self.pair_logps(logits, batch, device)
        ref = batch["ref_logps"].to(device).double()
        loss, _ = self.losses(logps, counts, ref)
        logps = logps.double()
        rewards = self.beta * (logps - ref)
        margin = rewards[:, 0] - rewards[:, 1]
        return {
            "loss_sum": loss.sum(),
            "targets": torch.tensor(float(len(loss)), dtype=torch.float64, device=loss.device),
            "reward_correct": (margin > 0).sum().double(),
            "margin_sum": margin.sum(),
            "chosen_reward_sum": rewards[:, 0].sum(),
            "rejected_reward_sum": rewards[:, 1].sum(),
            "chosen_logp_sum": logps[:, 0].sum(),
            "rejected_logp_sum": logps[:, 1].sum(),
            "chosen_tokens": counts[:, 0].sum().double(),
            "rejected_tokens": counts[:, 1].sum().double(),
            # Reference-free: does the model itself rank the chosen response higher? Comparable
            # across iterations, where rewards are relative to each run's own reference.
            "logp_correct": (logps[:, 0] > logps[:, 1]).sum().double(),
        }

    @staticmethod
    def metrics_from_sums(sums: dict[str, torch.Tensor]) -> dict[str, float]:
        s = {k: float(v) for k, v in sums.items()}
        pairs = max(s["targets"], 1.0)
        return {
            "loss": s["loss_sum"] / pairs,
            "reward_accuracy": s["reward_correct"] / pairs,
            "reward_margin": s["margin_sum"] / pairs,
            "chosen_reward": s["chosen_reward_sum"] / pairs,
            "rejected_reward": s["rejected_reward_sum"] / pairs,
            "chosen_logp": s["chosen_logp_sum"] / pairs,
            "rejected_logp": s["rejected_logp_sum"] / pairs,
            "chosen_logp_per_token": s["chosen_logp_sum"] / max(s["chosen_tokens"], 1.0),
            "rejected_logp_per_token": s["rejected_logp_sum"] / max(s["rejected_tokens"], 1.0),
            "logp_accuracy": s["logp_correct"] / pairs,
            "pairs": s["targets"],
        }


def adapters_disabled(model) -> contextlib.AbstractContextManager:
    """With LoRA the reference is the base model: PEFT's adapters switched off for the pass."""
    inner = model
    for _ in range(4):  # DDP / DeepSpeed wrap the module one level down
        if hasattr(inner, "disable_adapter"):
            return inner.disable_adapter()
        inner = getattr(inner, "module", None)
        if inner is None:
            break
    return contextlib.nullcontext()


@torch.no_grad()
def reference_logps(runner, task: PreferenceTask, pairs, *, micro_batch_size: int, rank: int,
                    world_size: int) -> np.ndarray:
    """[len(pairs), 2] float64 summed response log-probs of ``runner.model`` as it is now.

    ``pairs[i]`` is pair id ``i`` (the split's own order, not an epoch's). Rank r computes ids
    r, r + W, ...; every rank runs the same number of forwards (sharded strategies gather
    parameters inside forward) and the table is summed across ranks, so all hold all of it.
    """
    device = runner.ctx.device
    total = len(pairs)
    mine = list(range(rank, total, world_size))
    batches = math.ceil(math.ceil(total / world_size) / micro_batch_size) if total else 0
    table = torch.zeros((total, 2), dtype=torch.float64, device=device)
    was_training = runner.model.training
    runner.train(False)
    try:
        with adapters_disabled(runner.model):
            for b in range(batches):
                chunk = mine[b * micro_batch_size : (b + 1) * micro_batch_size]
                ids = chunk or [0]  # a rank out of pairs still joins the forward, and discards it
                samples = [pairs[i] for i in ids]
                batch = {k: torch.from_numpy(np.stack([s[k] for s in samples])) for k in ("input_ids", "labels",
                                                                                          "lengths")}
                with runner.autocast():
                    logits = task.logits(runner.model, batch, device)
                logps, _ = task.pair_logps(logits, batch, device)
                if chunk:
                    table[torch.tensor(chunk, device=device)] = logps.double()
    finally:
        runner.train(was_training)
    dist.all_reduce(table)
    return table.cpu().numpy()


class ReferenceTables:
    """The reference log-probs of every split, a stateful part of the checkpoint (trainer_state.json,
    key ``reference``, beside the data cursor): computed once before the first update, and on
    resume read back, never recomputed (the weights are no longer the reference's then).

    Stored as the float64 bytes (base64): exact, 16 bytes per pair (~21 MB of JSON per
    million pairs). ``sources``: split name -> a source with ``pairs()``, ``__len__`` and a
    ``reference`` attribute (``data.preference_source.PreferenceSource``).
    """

    def __init__(self, sources: dict, fingerprint: str = ""):
        self.sources = {name: s for name, s in sources.items() if s is not None}
        self.fingerprint = fingerprint  # of the data the tables belong to
        self.seconds = 0.0

    @property
    def complete(self) -> bool:
        return all(s.reference is not None for s in self.sources.values())

    def compute(self, runner, task: PreferenceTask, *, micro_batch_size: int, rank: int, world_size: int) -> None:
        import time

        start = time.perf_counter()
        for source in self.sources.values():
            source.reference = reference_logps(runner, task, source.pairs(), micro_batch_size=micro_batch_size,
                                               rank=rank, world_size=world_size)
        self.seconds = time.perf_counter() - start

    def state_dict(self) -> dict:
        import base64

        if not self.complete:
            return {}
        return {"fingerprint": self.fingerprint, "tables": {
            name: {"pairs": len(s), "float64_le": base64.b64encode(np.ascontiguousarray(s.reference, "<f8").tobytes())
                   .decode("ascii")} for name, s in self.sources.items()}}

    def load_state_dict(self, state: dict) -> None:
        import base64

        if not state:
            return
        if state.get("fingerprint") != self.fingerprint:
            raise CheckpointError("the checkpoint's reference log-probs belong to other preference data "
                             f"({state.get('fingerprint')!r}, this run's is {self.fingerprint!r})")
        for name, source in self.sources.items():
            entry = state["tables"].get(name)
            if entry is None or entry["pairs"] != len(source):
                raise CheckpointError(f"the checkpoint's reference log-probs of the {name} split do not match its "
                                 f"{len(source)} pairs")
            raw = base64.b64decode(entry["float64_le"])
            source.reference = np.frombuffer(raw, dtype="<f8").reshape(len(source), 2).astype(np.float64)


def reference_tables(task, data) -> ReferenceTables | None:
    """The run's tables when it is a preference run (``data``: its ``Datasets``), else None."""
    if not isinstance(task, PreferenceTask):
        return None
    return ReferenceTables({"train": data.train, "validation": data.validation, "test": data.test},
                           data.summary.get("fingerprint", ""))


def ensure_reference(parts, ctx, *, resumed: bool) -> str | None:
    """Before the baseline: compute the tables on a fresh start; a resumed run must have read them.

    ``parts``: the run's parts (``reference``, ``strategy``, ``task``); no-op for other tasks."""
    tables = parts.reference
    if tables is None or tables.complete:
        return None
    if resumed:
        raise CheckpointError("the checkpoint holds no reference log-probs (it was not written by a preference "
                              "run); a preference run cannot recompute them from trained weights: start it "
                              "afresh (checkpoint.resume=never)")
    strategy = parts.strategy
    tables.compute(strategy, parts.task, micro_batch_size=strategy.cfg.train.micro_batch_size,
                   rank=ctx.rank, world_size=ctx.world_size)
    pairs = sum(len(s) for s in tables.sources.values())
    lora = " with the LoRA adapters disabled" if strategy.cfg.finetune.strategy == "lora" else ""
    return f"reference log-probs of {pairs} pairs computed in one no-grad pass{lora} ({tables.seconds:.1f} s)"
