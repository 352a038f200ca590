"""Where the training data comes from and how ``shardtune data prepare`` builds it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from shardtune.config.base import Section


class SyntheticDataSection(Section):
    num_records: int = Field(4000, ge=8)


class SplitRatios(Section):
    """Shares of records by a hash of their content (data/splits.py), the same for every data path.

    The test split is evaluated once, at the end, with the best checkpoint."""

    train: float = Field(0.90, ge=0.0, le=1.0)
    validation: float = Field(0.05, ge=0.0, le=1.0)
    test: float = Field(0.05, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitRatios:
        if abs(self.train + self.validation + self.test - 1.0) > 1e-9 or self.train == 0:
            raise ValueError("split ratios must sum to 1 with train > 0")
        return self


class HFInputSection(Section):
    """How ``data prepare`` opens its Hugging Face dataset inputs (``hf:NAME[:CONFIG]`` or a
    ``save_to_disk`` directory; shardtune/data/hf_source.py)."""

    split: str | None = None
    """None: every split of a DatasetDict, in its order (the records are re-split by content hash)."""
    data_files: str | list[str] | dict[str, str | list[str]] | None = None
    """hf:json, hf:parquet, hf:csv"""
    streaming: bool = False
    """read hf:NAME in one pass without downloading or caching it whole"""


class PrepareSection(Section):
    """``shardtune data prepare``: cleaning, validation, splitting and sharding options."""

    inputs: list[str] = Field(default_factory=list)
    """files or globs; the CLI may give them instead"""
    file_type: Literal["auto", "jsonl", "csv", "parquet"] = "auto"
    """auto = by file suffix"""
    format: Literal["auto", "chat", "prompt_completion", "text", "labelled", "preference"] = "auto"
    on_bad_record: Literal["drop", "error"] = "drop"
    unicode_form: Literal["NFC", "NFKC"] = "NFC"
    """NFC is lossless; NFKC also folds compatibility forms (full-width, superscripts)."""
    allowed_roles: list[str] = Field(default_factory=lambda: ["system", "user", "assistant", "tool"])
    label_names: list[str] | None = None
    """classification labels; None = in order of first appearance"""
    max_tokens: int | None = Field(None, ge=2)
    max_chars: int | Literal["auto"] | None = "auto"
    """Characters per record and per message after normalisation (too_long drops). auto: 32 x data.seq_len, at
    least 8192 (docs/data.md); null: no limit.
    """
    max_message_chars: int | Literal["auto"] | None = "auto"
    overlong: Literal["drop", "truncate"] = "drop"
    near_dedup: bool = True
    near_dedup_threshold: float = Field(0.8, gt=0.0, le=1.0)
    """estimated Jaccard of word 5-grams"""
    near_dedup_min_tokens: int = Field(32, ge=1)
    """Shorter texts (words and punctuation runs) are left to exact dedup after normalisation: MinHash on them
    drops distinct records that differ in a name.
    """
    splits: SplitRatios = SplitRatios()
    shard_tokens: int = Field(1 << 26, ge=1)
    """a shard closes after the document crossing this"""
    chat_template: str | None = None
    """A Jinja chat template; None = the tokenizer's own, else a built-in ChatML-like one."""
    progress: bool = True
    workers: int = Field(1, ge=1)
    """Processes that parse and tokenize (1 = in this process). The output is identical for any count:
    de-duplication, splitting and writing stay in one process, in input order.
    """
    columns: dict[str, str] = Field(default_factory=dict)
    """Hugging Face dataset inputs: shardtune field <- dataset column, e.g. {messages: conversations}."""
    hf: HFInputSection = HFInputSection()

    @field_validator("max_chars", "max_message_chars")
    @classmethod
    def _positive_limit(cls, value: Any) -> Any:
        if isinstance(value, int) and value < 1:
            raise ValueError("must be at least 1 (or auto, or null for no limit)")
        return value


class MixtureSourceSection(Section):
    """One dataset of ``data.mixture``: a JSONL file, a Hugging Face dataset or a prepared
    directory, and its weight."""

    name: str | None = None
    """default: the file or directory name"""
    path: str | None = None
    """JSONL, hf:NAME[:CONFIG], or a save_to_disk directory"""
    prepared_dir: str | None = None
    weight: float = Field(gt=0, allow_inf_nan=False)
    split: str | None = None
    """For a Hugging Face dataset path, as data.prepare.hf.split / data_files / columns."""
    data_files: str | list[str] | dict[str, str | list[str]] | None = None
    columns: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_input(self) -> MixtureSourceSection:
        if (self.path is None) == (self.prepared_dir is None):
            raise ValueError("set exactly one of path (JSONL or Hugging Face dataset) or prepared_dir")
        return self

    @property
    def label(self) -> str:
        return self.name or Path(self.path or self.prepared_dir).name


class DataSection(Section):
    source: Literal["synthetic", "jsonl", "prepared"] = "synthetic"
    """``synthetic`` generates the built-in task (no files needed); ``jsonl`` reads prompt/completion or text
    records from ``path``; ``prepared`` memory-maps the shards ``shardtune data prepare`` wrote to
    ``prepared_dir``.
    """
    path: str | None = None
    prepared_dir: str | None = None
    verify_checksums: bool = True
    """Prepared shards are always checked for existence and size when a run opens them; this also hashes each
    (sha256, a sequential read of the split on every rank) against the manifest. Turn off for very large
    prepared sets on trusted storage.
    """
    prepare: PrepareSection = PrepareSection()
    seq_len: int = Field(256, ge=8)
    synthetic: SyntheticDataSection = SyntheticDataSection()
    packing: Literal["concat", "whole_documents"] = "concat"
    """``concat``: documents back to back, cut every seq_len tokens (no padding; a cut may separate a prompt
    from its response). ``whole_documents``: each document whole in one sequence, padded; longer ones
    truncated to seq_len (counted in data_summary.json).
    """
    num_workers: int = Field(0, ge=0)
    """Background threads building the next steps (0 = in the training loop's thread), and how many steps they
    may run ahead.
    """
    prefetch_steps: int = Field(2, ge=1)
    mixture: list[MixtureSourceSection] | None = None
    """Weighted datasets mixed into one order (causal LM); replaces source/path/prepared_dir."""

    @model_validator(mode="after")
    def _path_for_files(self) -> DataSection:
        if self.mixture is not None:
            if not self.mixture:
                raise ValueError("data.mixture needs at least one source")
            # By value, not by fields set: a dumped config (config.yaml) spells out the defaults.
            given = [k for k, default in (("source", "synthetic"), ("path", None), ("prepared_dir", None))
                     if getattr(self, k) != default]
            if given:
                raise ValueError(f"data.mixture replaces data.{'/'.join(given)}: remove them")
            labels = [m.label for m in self.mixture]
            repeated = sorted({x for x in labels if labels.count(x) > 1})
            if repeated:
                raise ValueError(f"data.mixture names must be unique (repeated: {', '.join(repeated)}); set name")
        if self.source == "jsonl" and not self.path:
            raise ValueError("data.source=jsonl needs data.path")
        if self.source == "prepared" and not self.prepared_dir:
            raise ValueError("data.source=prepared needs data.prepared_dir")
        return self
