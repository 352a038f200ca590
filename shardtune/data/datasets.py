"""The run's splits for its task: train / validation / test sources plus a data summary.

Causal LM: packed sequences (``corpus.build_sources`` or prepared shards). Classification:
padded labelled rows (``labelled``), from the built-in topic dataset, a JSONL file of
``{"text", "label"}`` records, or prepared shards made with ``format: labelled``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shardtune.config import RunConfig
from shardtune.data.corpus import (
    InMemorySource,
    load_records,
    read_jsonl_records,
    tokenize_records,
    with_packing,
)
from shardtune.data.hf_source import is_hf_input, read_mixture_records
from shardtune.data.splits import split_records
from shardtune.errors import DataError


@dataclass
class Datasets:
    train: object
    validation: object
    test: object | None
    label_names: list[str] | None = None
    summary: dict = field(default_factory=dict)

    @property
    def num_labels(self) -> int | None:
        return len(self.label_names) if self.label_names else None


def build_datasets(cfg: RunConfig, tokenizer) -> Datasets:
    if cfg.task == "preference":
        from shardtune.data.preference_source import preference_datasets

        return Datasets(**preference_datasets(cfg, tokenizer))
    if cfg.task == "classification":
        if cfg.data.mixture:
            raise DataError("data.mixture mixes causal-LM datasets; task=classification takes one dataset")
        return _classification(cfg, tokenizer)
    return _causal_lm(cfg, tokenizer)


def _causal_lm(cfg: RunConfig, tokenizer) -> Datasets:
    data, seed = cfg.data, cfg.run.seed
    if data.mixture:
        return _mixture(cfg, tokenizer)
    if data.source == "prepared":
        from shardtune.data.corpus import build_prepared_sources
        from shardtune.data.shards import PreparedSource
        from shardtune.data.tokenizer import tokenizer_fingerprint

        train, val = build_prepared_sources(data, tokenizer, seed)
        test = None
        if train.manifest["splits"].get("test", {}).get("documents", 0):
            test = with_packing(PreparedSource(data.prepared_dir, "test", data.seq_len, seed,
                                               tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
                                               verify=data.verify_checksums), data.packing)
        summary = {name: {"documents": s["documents"], "tokens": s.get("tokens")}
                   for name, s in train.manifest["splits"].items()}
        return Datasets(train, val, test, summary={"source": f"prepared ({data.prepared_dir})", "splits": summary,
                                                   "packing": train.epoch(0).stats()})
    records = load_records(data, seed)
    train, val, test = split_records(records, data.prepare.splits)
    if not train:
        raise DataError("no training records left after the validation/test split")

    def source(rs):
        return InMemorySource(tokenize_records(rs, tokenizer), data.seq_len, seed, data.packing)

    train_source = source(train)
    summary = {"source": data.source if data.source == "synthetic" else f"jsonl ({data.path})",
               "splits": {"train": {"documents": len(train)}, "validation": {"documents": len(val)},
                          "test": {"documents": len(test)}},
               "packing": train_source.epoch(0).stats()}
    # No validation records: evaluate on one training record rather than nothing.
    return Datasets(train_source, source(val or train[:1]), source(test) if test else None, summary=summary)


def _mixture_splits(cfg: RunConfig, tokenizer, entry) -> dict:
    """One mixture source's corpora by split (validation falls back to training data)."""
    data, seed = cfg.data, cfg.run.seed
    if entry.prepared_dir:
        from shardtune.data.shards import PreparedSource
        from shardtune.data.tokenizer import tokenizer_fingerprint

        fingerprint = tokenizer_fingerprint(tokenizer)
        train = PreparedSource(entry.prepared_dir, "train", data.seq_len, seed, tokenizer_fingerprint=fingerprint,
                               verify=data.verify_checksums)
        splits = {"train": train.corpus}
        for split in ("validation", "test"):
            if train.manifest["splits"].get(split, {}).get("documents", 0):
                splits[split] = PreparedSource(entry.prepared_dir, split, data.seq_len, seed,
                                               tokenizer_fingerprint=fingerprint,
                                               verify=data.verify_checksums).corpus
    else:
        if is_hf_input(entry.path):  # hf:NAME[:CONFIG] or a save_to_disk directory
            records = read_mixture_records(entry)
        else:
            records = read_jsonl_records(entry.path)
        train, val, test = split_records(records, data.prepare.splits)
        if not train:
            raise DataError(f"data.mixture source {entry.label} ({entry.path}) has no training records "
                            "after the validation/test split")
        splits = {"train": tokenize_records(train, tokenizer)}
        for split, rs in (("validation", val), ("test", test)):
            if rs:
                splits[split] = tokenize_records(rs, tokenizer)
    splits.setdefault("validation", splits["train"])
    return splits


def _mixture(cfg: RunConfig, tokenizer) -> Datasets:
    from shardtune.data.mixture import MixedSource, MixtureComponent

    data, seed = cfg.data, cfg.run.seed
    per_source = {m.label: (m, _mixture_splits(cfg, tokenizer, m)) for m in data.mixture}

    def mixed(split: str) -> MixedSource | None:
        parts = [MixtureComponent(label, splits[split], m.weight)
                 for label, (m, splits) in per_source.items() if split in splits]
        return MixedSource(parts, data.seq_len, seed, data.packing) if parts else None

    train = mixed("train")
    summary = {
        "source": "mixture (" + ", ".join(f"{label} x{m.weight:g}" for label, (m, _) in per_source.items()) + ")",
        "splits": {split: {"documents": sum(s[split].num_documents for _, s in per_source.values() if split in s)}
                   for split in ("train", "validation", "test")},
        # Sequences each source supplies to one epoch (epoch 0) of the mixed training order.
        "mixture": train.summary(0),
    }
    return Datasets(train, mixed("validation"), mixed("test"), summary=summary)


def _classification(cfg: RunConfig, tokenizer) -> Datasets:
    from shardtune.data.labelled import (
        ClassificationSource,
        examples_from_prepared,
        examples_from_records,
        label_vocabulary,
    )

    data, seed = cfg.data, cfg.run.seed
    if data.source == "prepared":
        from shardtune.data.shards import PreparedSource, read_manifest
        from shardtune.data.tokenizer import tokenizer_fingerprint

        manifest = read_manifest(data.prepared_dir)
        names = list(manifest.get("labels") or [])
        if not names:
            raise DataError(f"{data.prepared_dir} has no labels: prepare it from labelled records")
        fingerprint = tokenizer_fingerprint(tokenizer)
        splits = {}
        for split in ("train", "validation", "test"):
            if manifest["splits"].get(split, {}).get("documents", 0):
                src = PreparedSource(data.prepared_dir, split, data.seq_len, seed, tokenizer_fingerprint=fingerprint,
                                     verify=data.verify_checksums)
                splits[split] = examples_from_prepared(src, tokenizer, data.seq_len)
        source_name = f"prepared ({data.prepared_dir})"
    else:
        records = load_records(data, seed, task="classification")
        missing = [i for i, r in enumerate(records) if "label" not in r]
        if missing:
            raise DataError(f"task=classification needs a 'label' in every record (record {missing[0]} has none)")
        names = label_vocabulary(records, data.prepare.label_names)
        parts = dict(zip(("train", "validation", "test"),
                         split_records(records, data.prepare.splits), strict=True))
        splits = {k: examples_from_records(v, names, tokenizer, data.seq_len) for k, v in parts.items() if v}
        source_name = "synthetic topic classification" if data.source == "synthetic" else f"jsonl ({data.path})"
    if "train" not in splits:
        raise DataError("no training records left after the validation/test split")
    train = ClassificationSource(splits["train"], seed)
    val = ClassificationSource(splits.get("validation", splits["train"]), seed, shuffle=False)
    test = ClassificationSource(splits["test"], seed, shuffle=False) if "test" in splits else None
    summary = {
        "source": source_name, "labels": names,
        "splits": {k: {"documents": len(v), "label_counts": ClassificationSource(v, seed).label_counts(len(names))}
                   for k, v in splits.items()},
        "seq_len": data.seq_len,
        "truncated": {k: int((v.attention_mask[:, -1] == 1).sum()) for k, v in splits.items()},
    }
    return Datasets(train, val, test, label_names=names, summary=summary)
