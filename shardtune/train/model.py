"""Models and tokenizers: Hugging Face checkpoints, or built from a config for tiny runs.

Nothing here knows about parallelism; strategies receive the plain ``nn.Module``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from shardtune.config import ModelSection, TokenizerSection

SPECIAL_TOKENS = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>"}


def train_tokenizer(texts: Iterable[str], vocab_size: int, save_dir: Path):
    """A byte-level BPE trained on the run's own text: no download, any language."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, **SPECIAL_TOKENS)
    tokenizer.save_pretrained(str(save_dir))
    return tokenizer


def load_tokenizer(cfg: TokenizerSection, trust_remote_code: bool, saved_dir: Path | None = None):
    from transformers import AutoTokenizer

    source = cfg.name_or_path or (str(saved_dir) if saved_dir else None)
    if source is None:
        raise ValueError("tokenizer.name_or_path is not set and no trained tokenizer was saved")
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_model(cfg: ModelSection, tokenizer, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    if cfg.name_or_path is not None:
        model = AutoModelForCausalLM.from_pretrained(
            cfg.name_or_path,
            revision=cfg.revision,
            trust_remote_code=cfg.trust_remote_code,
            attn_implementation=cfg.attn_implementation,
            dtype=dtype,
        )
    else:
        kwargs = dict(cfg.config)
        model_type = kwargs.pop("model_type")
        kwargs.setdefault("vocab_size", len(tokenizer))
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            kwargs.setdefault(name, getattr(tokenizer, name))
        config = AutoConfig.for_model(model_type, **kwargs)
        model = AutoModelForCausalLM.from_config(
            config, attn_implementation=cfg.attn_implementation, dtype=dtype,
            trust_remote_code=cfg.trust_remote_code,
        )
    # With a KV cache, transformers builds its mask from the cache and silently ignores the
    # per-document position_ids of packed sequences: documents would attend to each other.
    model.config.use_cache = False
    if cfg.activation_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    return model


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    total = trainable = 0
    for p in model.parameters():
        n = p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    return total, trainable
