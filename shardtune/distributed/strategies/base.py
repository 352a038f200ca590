"""The one interface the training loop sees; each strategy owns how a model is sharded.

Losses handed to ``backward`` are already normalised by the global number of loss tokens
in the step and multiplied by the world size, because every strategy averages gradients
over data-parallel ranks. The result is the gradient of the global token-mean loss,
independent of how the step's sequences are split across ranks and micro-batches.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from shardtune.config import RunConfig
from shardtune.distributed.process_group import DistContext


@dataclass
class StepOutcome:
    grad_norm: float
    applied: bool


class Strategy(ABC):
    name: str

    def __init__(self, cfg: RunConfig, ctx: DistContext):
        self.cfg = cfg
        self.ctx = ctx
        self.bf16 = resolve_bf16(cfg, ctx)
        self.model: torch.nn.Module | None = None  # what the loop calls forward on
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler = None
        # Parameter name -> multiplier on train.lr (discriminative / layer-wise rates), set by
        # build_run from the fine-tuning plan before ``setup``; None = one rate for all.
        self.lr_scales: dict[str, float] | None = None
        # Set by ``build_meta_model``: where a meta-built model's values come from.
        self.weights = None
        self.load_note = "full build on every rank"
        # Host VmHWM (MiB) once a meta-built model's weights are in place, before the
        # optimizer or engine allocates its own state; None for a full build, whose weights
        # are in place when ``build_model`` returns.
        self.load_peak_host_mib: float | None = None

    # -- the model-loading entry: how this strategy wants its model built --------------
    # Replicating strategies (ddp, zero1, zero2) hold the whole model on every rank anyway:
    # each builds it in full (``from_pretrained`` memory-maps the safetensors files, so the
    # ranks of a node share one page cache copy of the checkpoint). Sharding strategies
    # override this to build on ``meta`` and load only their shards in ``setup``.

    def build_model(self, tokenizer, label_names: list[str] | None = None) -> torch.nn.Module:
        """The model for ``setup`` (call after ``torch.manual_seed``): the full build, unless a
        sharding strategy builds on ``meta``."""
        return self.full_build(tokenizer, label_names)

    def full_build(self, tokenizer, label_names: list[str] | None = None) -> torch.nn.Module:
        """The whole model on every rank. Not ``build_model``: strategies that override it to
        build on meta fall back to this one."""
        from shardtune.models.loading import build_model

        cfg = self.cfg
        return build_model(cfg.model, tokenizer, task=cfg.task, label_names=label_names,
                           dropout=cfg.finetune.dropout)

    def build_meta_model(self, tokenizer, label_names: list[str] | None = None) -> torch.nn.Module:
        """For sharding strategies: the model on ``meta``, its values kept for ``setup``;
        the full build where a meta build cannot give the same model."""
        from shardtune.models.sharded_load import NotShardable, build_meta_model

        cfg = self.cfg
        if cfg.finetune.strategy == "lora":
            # PEFT adds and initialises its adapters after the build, outside the replay.
            self.load_note = "full build (finetune.strategy=lora)"
            return self.full_build(tokenizer, label_names)
        try:
            model, self.weights = build_meta_model(cfg.model, tokenizer, task=cfg.task,
                                                   label_names=label_names, dropout=cfg.finetune.dropout)
        except NotShardable as why:
            self.load_note = f"full build ({why})"
            return self.full_build(tokenizer, label_names)
        self.load_note = "sharded: meta build, " + (
            "shards read from safetensors" if self.weights.checkpoint else "shards initialised")
        return model

    @abstractmethod
    def setup(self, model: torch.nn.Module, total_steps: int) -> None:
        """Shard ``model`` (materialising it from ``self.weights`` if it was built on meta)
        and build its optimizer and scheduler."""

    def micro_step(self, is_last: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-batch's forward+backward; skips gradient sync before the last."""
        return contextlib.nullcontext()

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    @abstractmethod
    def backward(self, loss: torch.Tensor, is_last: bool) -> None: ...

    def local_grads_finite(self) -> bool:
        """Before the step's all-reduce: False when this rank's own gradients are not finite.

        Only a strategy that clips with a norm computed from its local replica (DDP) needs
        this: a gradient corrupted after the reduction would make that rank alone skip the
        update. FSDP2 and ZeRO reduce the norm across ranks, so every rank already agrees.
        """
        return True

    @abstractmethod
    def step(self, max_grad_norm: float | None, skip: bool) -> StepOutcome:
        """Clip, then update (unless ``skip``), advance the schedule and clear gradients."""

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.model

    # Checkpoint state. Every strategy speaks one logical layout, so any strategy can load
    # any other's checkpoint: {"model": {fqn: tensor}, "optim": {"state": {fqn: {"step",
    # "exp_avg", "exp_avg_sq"}}}} with Hugging Face parameter names and unsharded shapes
    # (DTensors carry the unsharded shape too). Hyperparameters live in JSON, not here.

    @abstractmethod
    def checkpoint_state(self) -> dict:
        """The tensors to save: model weights and optimizer moments, logical layout."""

    @abstractmethod
    def checkpoint_template(self) -> dict:
        """Tensors with this rank's target placement for ``dcp.load`` to fill in place."""

    @abstractmethod
    def load_checkpoint_state(self, filled: dict) -> None:
        """Apply a template filled by ``dcp.load``."""

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    def current_lr(self) -> float:
        """The base rate: ``train.lr`` times the schedule (groups with scale 1, else the first)."""
        groups = self.optimizer.param_groups
        base = [g for g in groups if g.get("lr_scale", 1.0) == 1.0] or groups
        return float(base[0]["lr"])


def resolve_bf16(cfg: RunConfig, ctx: DistContext) -> bool:
    precision = cfg.distributed.precision
    if precision == "auto":
        return ctx.device.type == "cuda"
    return precision == "bf16"


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks, found through the model's own ``_no_split_modules``."""
    block_names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in block_names]
    if not blocks:
        raise ValueError(
            f"cannot find transformer blocks in {type(model).__name__}: it declares no "
            "_no_split_modules; FSDP2 would shard it as one unit and train.compile=blocks has nothing to compile"
        )
    return blocks


def apply_compile(model: torch.nn.Module, mode: str) -> None:
    """torch.compile each block's ``forward`` (or the model's) in place, before any wrapping.

    Compiling ``forward`` rather than wrapping the module keeps parameter names (checkpoints
    stay interchangeable with eager runs) and keeps module hooks (FSDP2's all-gather and
    reshard) outside the graphs, which is the order torchtitan uses: per-block compile, then
    ``fully_shard``. Activation checkpointing, applied by ``build_model`` inside
    ``forward``, is traced into the graph.
    """
    if mode == "none":
        return
    targets = transformer_blocks(model) if mode == "blocks" else [model]
    for module in targets:
        module.forward = torch.compile(module.forward)


def torch_clip_and_step(
    strategy: Strategy, params, max_grad_norm: float | None, skip: bool, norm: torch.Tensor | None = None
) -> StepOutcome:
    """Shared by DDP and FSDP2: both leave plain (or DTensor) gradients on the parameters.

    ``norm``: the total gradient norm when the caller already computed it (the same
    arithmetic as ``clip_grad_norm_``, which is these two calls).
    """
    params = [p for p in params if p.grad is not None]
    limit = max_grad_norm if max_grad_norm is not None else float("inf")
    if norm is None:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
    torch.nn.utils.clip_grads_with_norm_(params, limit, norm, foreach=True)
    if hasattr(norm, "full_tensor"):  # FSDP2 returns a DTensor; the reduction is already global
        norm = norm.full_tensor()
    norm = float(norm)
    finite = norm == norm and norm != float("inf")
    applied = not skip and finite
    if applied:
        strategy.optimizer.step()
    strategy.optimizer.zero_grad(set_to_none=True)
    strategy.scheduler.step()
    return StepOutcome(grad_norm=norm, applied=applied)


class TorchStateMixin:
    """DDP and FSDP2: torch's distributed state-dict API already gives the logical layout."""

    def _dcp_module(self) -> torch.nn.Module:
        return self.model

    def checkpoint_state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self._dcp_module(), self.optimizer)
        return {"model": model_sd, "optim": {"state": optim_sd["state"]}}

    def checkpoint_template(self) -> dict:
        # get_state_dict materialises the optimizer moments (a zero-lr step) on a fresh
        # optimizer, so the template has every tensor the checkpoint holds.
        return self.checkpoint_state()

    def load_checkpoint_state(self, filled: dict) -> None:
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        _, current = get_state_dict(self._dcp_module(), self.optimizer)
        set_state_dict(
            self._dcp_module(), self.optimizer,
            model_state_dict=filled["model"],
            optim_state_dict={"state": filled["optim"]["state"], "param_groups": current["param_groups"]},
        )
