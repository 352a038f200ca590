"""Models and tokenizers: Hugging Face checkpoints, or built from a config for tiny runs.

Nothing here knows about parallelism; strategies receive the plain ``nn.Module``.
"""

from __future__ import annotations

import torch

from shardtune.config import ModelSection, TokenizerSection
from shardtune.data.tokenizer import load_tokenizer, resolve_model_path
from shardtune.errors import ConfigError
from shardtune.models.gguf import is_gguf, resolve_gguf

# Config attributes that hold a dropout probability, across model families.
DROPOUT_KEYS = (
    "hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout", "attention_dropout",
    "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_first_dropout",
)


def refuse_remote_code(exc: ValueError, key: str, spec: str) -> Exception:
    """transformers' refusal to run a model's own code, as one line naming the key; else ``exc``."""
    if "trust_remote_code" not in str(exc):
        return exc
    return ConfigError(f"{key}.name_or_path={spec} ships its own Python code, which shardtune runs only with "
                       "model.trust_remote_code=true: set it only for a source you trust (the code runs with "
                       "your permissions)")


def override_dropout(config, rate: float) -> list[str]:
    changed = [k for k in DROPOUT_KEYS if hasattr(config, k)]
    for key in changed:
        setattr(config, key, rate)
    return changed


def resolve_pretrained(spec: str | None) -> str | None:
    """Where a ``name_or_path`` loads from: a ``.gguf`` file (or ``pkg:`` spec naming one)
    becomes its imported safetensors directory (imported once, then cached); ``pkg:`` a
    directory inside an installed package; anything else is returned unchanged."""
    return resolve_gguf(spec) if is_gguf(spec) else resolve_model_path(spec)


def model_code_module(cfg: ModelSection) -> str | None:
    """The transformers module that defines this model's classes, where naming it is cheap: a
    model from a config, or a local checkpoint directory (not a hub id or a GGUF file)."""
    import json
    from pathlib import Path

    from transformers.models.auto.configuration_auto import model_type_to_module_name

    if cfg.name_or_path is None:
        model_type = dict(cfg.config).get("model_type")
    else:
        try:
            model_type = json.loads((Path(cfg.name_or_path) / "config.json").read_text()).get("model_type")
        except (OSError, ValueError):
            model_type = None
    if not model_type:
        return None
    name = model_type_to_module_name(model_type)
    return f"transformers.models.{name}.modeling_{name}"


def load_model_tokenizer(cfg: TokenizerSection, trust_remote_code: bool, saved_dir=None):
    """``data.tokenizer.load_tokenizer``, with ``name_or_path`` resolved as for the model."""
    if is_gguf(cfg.name_or_path):
        cfg = cfg.model_copy(update={"name_or_path": resolve_gguf(cfg.name_or_path)})
    return load_tokenizer(cfg, trust_remote_code, saved_dir)


def model_class_and_config(
    cfg: ModelSection, tokenizer, *, task: str = "causal_lm", label_names: list[str] | None = None,
    dropout: float | None = None,
):
    """(auto class, transformers config, checkpoint path or None) for ``build_model`` and for
    the strategies' meta-device builds (``models.sharded_load``), so both see one config."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    task_kwargs = {}
    if task == "classification":
        task_kwargs = dict(
            num_labels=len(label_names), id2label=dict(enumerate(label_names)),
            label2id={name: i for i, name in enumerate(label_names)},
        )
    if cfg.name_or_path is not None:
        path = resolve_pretrained(cfg.name_or_path)
        try:
            config = AutoConfig.from_pretrained(
                path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, **task_kwargs
            )
        except ValueError as exc:
            raise refuse_remote_code(exc, "model", cfg.name_or_path) from None
        if task == "classification" and getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = tokenizer.pad_token_id  # decoder classifiers pool the last non-pad token
    else:
        path = None
        kwargs = dict(cfg.config)
        model_type = kwargs.pop("model_type")
        kwargs.setdefault("vocab_size", len(tokenizer))
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            kwargs.setdefault(name, getattr(tokenizer, name))
        config = AutoConfig.for_model(model_type, **kwargs, **task_kwargs)
    if dropout is not None:
        override_dropout(config, dropout)
    return auto, config, path


def build_model(
    cfg: ModelSection, tokenizer, dtype: torch.dtype = torch.float32, *,
    task: str = "causal_lm", label_names: list[str] | None = None, dropout: float | None = None,
) -> torch.nn.Module:
    """A causal LM, or a sequence classifier with ``len(label_names)`` outputs (its head is new)."""
    auto, config, path = model_class_and_config(
        cfg, tokenizer, task=task, label_names=label_names, dropout=dropout
    )
    if path is not None:
        model = auto.from_pretrained(
            path,
            config=config,
            revision=cfg.revision,
            trust_remote_code=cfg.trust_remote_code,
            attn_implementation=cfg.attn_implementation,
            dtype=dtype,
        )
    else:
        model = auto.from_config(
            config, attn_implementation=cfg.attn_implementation, dtype=dtype,
            trust_remote_code=cfg.trust_remote_code,
        )
    # With a KV cache, transformers builds its mask from the cache and silently ignores the
    # per-document position_ids of packed sequences: documents would attend to each other.
    model.config.use_cache = False
    apply_activation_checkpointing(model, cfg)
    return model


def apply_activation_checkpointing(model: torch.nn.Module, cfg: ModelSection) -> None:
    """Recompute block activations in backward: every block (full) or every n-th (selective).

    Transformers checkpoints each block's ``forward``, inside the module's hooks, so FSDP2's
    all-gather hooks run once per forward, not again on the recompute; non-reentrant, so it
    composes with ``torch.compile`` and with gradient accumulation under DDP's ``no_sync``.
    """
    if cfg.activation_checkpointing == "none":
        return
    every = 1 if cfg.activation_checkpointing == "full" else cfg.activation_checkpointing_every
    model.activation_checkpointing_enable({"use_reentrant": False}, every_n_layers=every)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    total = trainable = 0
    for p in model.parameters():
        n = p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    return total, trainable
