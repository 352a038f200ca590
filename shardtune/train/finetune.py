"""Fine-tuning strategies, applied in one place to the plain model before any parallel wrapping.

* ``full``: every parameter trains.
* ``frozen_head``: the pre-trained base is frozen; the task head (the parameters outside the
  model's base, e.g. ``classifier.*`` or ``lm_head.weight``) trains, plus the top
  ``train_last_blocks`` transformer blocks.
* ``lora``: PEFT LoRA adapters on ``lora.target_modules``; the base is frozen, the task head
  trains (it is new for classification). Parameter names gain PEFT's ``base_model.model.``
  prefix, which is what checkpoints of a LoRA run hold.

It also decides each trainable parameter's learning-rate scale (relative to ``train.lr``):
``head_lr / lr`` for the head, ``layer_decay ** depth`` for pre-trained parameters, where the
top block has depth 0, each block below one more, and the embeddings are the deepest.
``optim.param_groups`` turns those scales into parameter groups (keeping the no-decay rule).

Frozen parameters simply have ``requires_grad=False``: DDP, FSDP2 (mixed frozen/trainable
parameters inside one block included) and DeepSpeed ZeRO all accept that, and they get no
optimizer state.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from shardtune.config import FinetuneSection

_BLOCK = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")
_DEFAULT_LORA_TARGETS = (
    (("q_proj",), ["q_proj", "k_proj", "v_proj", "o_proj"]),
    (("query",), ["query", "key", "value"]),
    (("c_attn",), ["c_attn"]),
    (("qkv_proj",), ["qkv_proj", "o_proj"]),
)


@dataclass
class FinetunePlan:
    strategy: str
    lr_scales: dict[str, float]  # trainable parameter name -> multiplier on train.lr
    head: list[str]  # names of the task-head parameters
    num_blocks: int
    total_params: int
    trainable_params: int
    lora_targets: list[str] = field(default_factory=list)

    def describe(self) -> str:
        share = 100.0 * self.trainable_params / max(1, self.total_params)
        return (f"finetune {self.strategy}: {self.trainable_params:,} of {self.total_params:,} "
                f"parameters train ({share:.2f}%)")


def block_index(name: str) -> int | None:
    match = _BLOCK.search(name)
    return int(match.group(1)) if match else None


def head_parameter_ids(model: torch.nn.Module) -> set[int]:
    """The task head: parameters outside the model's pre-trained base (``base_model_prefix``).

    For a causal LM with tied embeddings the output projection is the input embedding, so
    training "the head" trains that shared matrix.
    """
    prefix = getattr(model, "base_model_prefix", "") or ""
    ids = {id(p) for n, p in model.named_parameters() if prefix and not n.startswith(prefix + ".")}
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None:
        ids |= {id(p) for p in out.parameters()}
    return ids


def lora_targets(model: torch.nn.Module, configured: list[str] | None) -> list[str]:
    if configured:
        return list(configured)
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    for needles, targets in _DEFAULT_LORA_TARGETS:
        if all(n in names for n in needles):
            return targets
    raise ValueError(f"cannot guess LoRA target modules for {type(model).__name__}; set finetune.lora.target_modules")


def apply_finetuning(model: torch.nn.Module, ft: FinetuneSection, base_lr: float) -> tuple[torch.nn.Module, FinetunePlan]:
    """Freeze / wrap ``model`` for ``ft.strategy``; returns the model to train and its plan."""
    head_ids = head_parameter_ids(model)
    targets: list[str] = []
    if ft.strategy == "lora":
        from peft import LoraConfig, get_peft_model

        targets = lora_targets(model, ft.lora.target_modules)
        model = get_peft_model(model, LoraConfig(
            r=ft.lora.r, lora_alpha=ft.lora.alpha, lora_dropout=ft.lora.dropout, target_modules=targets,
        ))
    params = list(model.named_parameters())
    blocks = [b for b in (block_index(n) for n, _ in params) if b is not None]
    num_blocks = max(blocks) + 1 if blocks else 0
    for name, p in params:
        is_head = id(p) in head_ids
        if ft.strategy == "full":
            p.requires_grad_(True)
        elif ft.strategy == "frozen_head":
            b = block_index(name)
            in_top = b is not None and b >= num_blocks - ft.train_last_blocks
            p.requires_grad_((is_head and ft.train_head) or in_top)
        else:  # lora: get_peft_model froze everything but the adapters
            p.requires_grad_(("lora_" in name) or (is_head and ft.train_head))
    head_lr = ft.head_lr if ft.head_lr is not None else base_lr
    lr_scales = {}
    for name, p in params:
        if not p.requires_grad:
            continue
        if id(p) in head_ids:
            lr_scales[name] = head_lr / base_lr
        else:
            lr_scales[name] = (ft.layer_decay or 1.0) ** _depth(name, num_blocks)
    total = sum(p.numel() for _, p in params)
    trainable = sum(p.numel() for _, p in params if p.requires_grad)
    if trainable == 0:
        raise ValueError(f"finetune.strategy={ft.strategy} leaves no trainable parameter in this model")
    plan = FinetunePlan(ft.strategy, lr_scales, [n for n, p in params if id(p) in head_ids],
                        num_blocks, total, trainable, targets)
    return model, plan


def _depth(name: str, num_blocks: int) -> int:
    """0 for the top block (and parameters above the blocks), num_blocks for the embeddings."""
    b = block_index(name)
    if b is not None:
        return num_blocks - 1 - b
    return num_blocks if "embed" in name else 0


def count_trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
