"""In-memory corpora for the training core: records -> tokenized train/validation corpora.

Records are prompt/completion pairs (loss on the completion only) or plain text. The split
is decided by a hash of each record's content, so adding records never moves existing ones
between train and validation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from shardtune.config import DataSection
from shardtune.data.packing import (
    CorpusPacker,
    PackedEpoch,
    TokenizedCorpus,
    WholeDocumentEpoch,
    plan_cache_beside,
)
from shardtune.data.splits import split_records
from shardtune.data.synthetic import generate_records
from shardtune.errors import DataError


def read_jsonl_records(path: str | Path) -> list[dict[str, str]]:
    records = []
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise DataError(f"{path}:{lineno}: not a valid UTF-8 JSON line ({exc})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object")
            has_pair = isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str)
            if not has_pair and not isinstance(record.get("text"), str):
                raise DataError(
                    f"{path}:{lineno}: needs string fields 'prompt' and 'completion', or 'text'"
                )
            records.append(record)
    return records


def record_text(record: dict[str, str]) -> str:
    if "text" in record and "prompt" not in record:
        return record["text"]
    return record["prompt"] + "\n" + record["completion"]


def tokenize_records(records: list[dict[str, str]], tokenizer) -> TokenizedCorpus:
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    prompts = [r["prompt"] + "\n" if "prompt" in r else "" for r in records]
    bodies = [r["completion"] if "prompt" in r else r["text"] for r in records]
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    body_ids = tokenizer(bodies, add_special_tokens=False)["input_ids"]
    docs, prompt_lengths = [], []
    for p, b in zip(prompt_ids, body_ids, strict=True):
        docs.append(bos + p + b + eos)
        prompt_lengths.append(len(bos) + len(p))
    return TokenizedCorpus.from_documents(docs, prompt_lengths, vocab_size=len(tokenizer))


@dataclass
class InMemorySource:
    """A ``SequenceSource`` over a tokenized corpus (in memory, or memory-mapped shards)."""

    corpus: TokenizedCorpus
    seq_len: int
    seed: int
    packing: str = "concat"
    _packer: CorpusPacker = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._packer = CorpusPacker(self.corpus, self.seq_len, self.seed, self.packing)

    def epoch(self, epoch: int) -> PackedEpoch | WholeDocumentEpoch:
        return self._packer.epoch(epoch)


class RepackedSource:
    """A prepared source packed by another packer; everything else (manifest, split) is its own."""

    def __init__(self, prepared, packing: str):
        self.prepared = prepared
        # A built whole_documents plan is kept beside the shards: resume reads it in ms.
        cache = plan_cache_beside(prepared.prepared_dir, prepared.split, prepared.manifest["splits"][prepared.split])
        self._packer = CorpusPacker(prepared.corpus, prepared.seq_len, prepared.seed, packing, plan_cache=cache)

    def epoch(self, epoch: int) -> PackedEpoch | WholeDocumentEpoch:
        return self._packer.epoch(epoch)

    def __getattr__(self, name: str):
        if name == "prepared":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.prepared, name)


def with_packing(source, packing: str):
    """``source`` itself for the default packer, so prepared shards keep their own ``epoch``."""
    return source if packing == "concat" else RepackedSource(source, packing)


def load_records(cfg: DataSection, seed: int, task: str = "causal_lm") -> list[dict[str, str]]:
    if cfg.mixture:
        # For a tokenizer trained on the run's text: every mixed dataset's records.
        prepared = [m.prepared_dir for m in cfg.mixture if m.prepared_dir]
        if prepared:
            raise DataError(
                f"data.mixture includes prepared_dir {prepared[0]}: set tokenizer.name_or_path="
                f"{Path(prepared[0]) / 'tokenizer'} (the tokenizer the shards were prepared with)"
            )
        from shardtune.data.hf_source import is_hf_input, read_mixture_records

        return [r for m in cfg.mixture
                for r in (read_mixture_records(m) if is_hf_input(m.path) else read_jsonl_records(m.path))]
    if cfg.source == "synthetic":
        if task == "classification":
            from shardtune.data.labelled import generate_labelled_records

            return generate_labelled_records(cfg.synthetic.num_records, seed)
        return generate_records(cfg.synthetic.num_records, seed)
    if cfg.source == "prepared":
        # Reached when the run would train its own tokenizer: prepared shards need the one they were made with.
        raise DataError(
            f"data.source=prepared needs tokenizer.name_or_path={Path(cfg.prepared_dir) / 'tokenizer'} "
            "(the tokenizer the shards were prepared with)"
        )
    return read_jsonl_records(cfg.path)


def build_prepared_sources(cfg: DataSection, tokenizer, seed: int):
    from shardtune.data.shards import PreparedSource
    from shardtune.data.tokenizer import tokenizer_fingerprint

    fingerprint = tokenizer_fingerprint(tokenizer)
    train = PreparedSource(cfg.prepared_dir, "train", cfg.seq_len, seed, tokenizer_fingerprint=fingerprint,
                           verify=cfg.verify_checksums)
    train = with_packing(train, cfg.packing)
    if train.manifest["splits"]["validation"]["documents"] == 0:
        return train, train  # mirrors the in-memory path, which evaluates on training data when it must
    val = PreparedSource(cfg.prepared_dir, "validation", cfg.seq_len, seed, tokenizer_fingerprint=fingerprint,
                         verify=cfg.verify_checksums)
    return train, with_packing(val, cfg.packing)


def build_sources(cfg: DataSection, tokenizer, seed: int) -> tuple[InMemorySource, InMemorySource]:
    if cfg.source == "prepared":
        return build_prepared_sources(cfg, tokenizer, seed)
    records = load_records(cfg, seed)
    train, val, _ = split_records(records, cfg.prepare.splits)
    if not train:
        raise DataError("no training records left after the validation split")
    train_src = InMemorySource(tokenize_records(train, tokenizer), cfg.seq_len, seed, cfg.packing)
    # Validation order is fixed (epoch 0), so every evaluation sees the same sequences.
    val_src = InMemorySource(tokenize_records(val or train[:1], tokenizer), cfg.seq_len, seed, cfg.packing)
    return train_src, val_src
