"""``shardtune data prepare``: raw files -> cleaned, split, tokenized, checksummed shards.

One streaming pass in input order: read -> validate -> normalise -> exact dedup -> near
dedup -> split by content hash -> tokenize (batched) -> append to the split's shard. Keeping
the first occurrence of each (near-)duplicate in input order means appending files later
never changes which earlier records are kept, and the content-hash split never moves them.

The output directory is written under a temporary name and renamed at the end, so an
interrupted run never leaves a half-written dataset behind a valid-looking manifest. A run
whose fingerprint (inputs' sha256, settings, tokenizer, chat template, format version)
matches the existing manifest, and whose shards still verify, does nothing.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from shardtune.config import PrepareSection
from shardtune.data.encoder import DocumentEncoder, resolve_chat_template
from shardtune.data.hf_source import HFInput, is_hf_input, open_hf_input
from shardtune.data.preference import RatingsTally, pair_ratings
from shardtune.data.prepare_checks import (
    checked_auto_format,
    fail_on_first_invalid,
    nothing_kept_error,
    record_rules,
    resolve_length_limits,
)
from shardtune.data.prepare_workers import parse_and_encode_in_workers, parse_or_reject
from shardtune.data.readers import check_input_file, read_raw_records
from shardtune.data.records import BadRecord, NearDuplicateIndex, Record, parse_record
from shardtune.data.report import Accounting, write_report
from shardtune.data.shards import (
    FORMAT_VERSION,
    MANIFEST,
    SPLITS,
    ShardWriter,
    read_manifest,
    token_dtype,
    verify_shards,
)
from shardtune.data.splits import assign_split
from shardtune.data.tokenizer import tokenizer_fingerprint
from shardtune.errors import DataError, ShardError
from shardtune.integrity import sha256_file, sha256_json
from shardtune.run_dirs import make_run_dir

# Problems with the input itself; ``on_bad_record: error`` turns these into hard errors.
# Other drops (empty, duplicates, too long) are cleaning decisions and never fail the run.
INVALID_REASONS = frozenset({
    "undecodable_bytes", "malformed_json", "malformed_csv", "not_an_object",
    "missing_field", "wrong_type", "unknown_role", "unknown_label",
})

ENCODE_BATCH = 512


@dataclass
class PrepareResult:
    out_dir: Path
    manifest: dict
    report: dict
    cached: bool


# --------------------------------------------------------------------------------------
# Fingerprints


def resolve_inputs(patterns: list[str], settings: PrepareSection | None = None) -> list[Path | HFInput]:
    paths: list = []
    for pattern in patterns:
        if is_hf_input(pattern):  # hf:NAME[:CONFIG] or a save_to_disk directory (data/hf_source.py)
            paths.append(open_hf_input(pattern, settings or PrepareSection()))
            continue
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise FileNotFoundError(f"no input file matches {pattern!r}")
        for m in matches:
            if Path(m) not in paths:
                paths.append(Path(m))
    for p in paths:
        if isinstance(p, HFInput):
            continue
        check_input_file(p)
    return paths


def job_fingerprint(inputs: list[dict], settings: PrepareSection, tokenizer_spec: str, template: str) -> str:
    return sha256_json({
        "format_version": FORMAT_VERSION,
        "inputs": inputs,
        "settings": settings.model_dump(mode="json", exclude={"inputs", "progress", "workers"}),
        "tokenizer": tokenizer_spec,
        "template": hashlib.sha256(template.encode()).hexdigest(),
    })


# --------------------------------------------------------------------------------------
# The pipeline


class _Pipeline:
    def __init__(self, settings: PrepareSection, encoder: DocumentEncoder, out_dir: Path, dtype):
        self.settings = settings
        self.encoder = encoder
        self.rules = record_rules(settings)
        self.acc = Accounting(SPLITS)
        self.ratings = RatingsTally()  # rating records, before they become pairs (ratings.json)
        self.seen: dict[bytes, str] = {}  # dedup key -> file:line of the record kept
        self.near = (NearDuplicateIndex(settings.near_dedup_threshold, min_tokens=settings.near_dedup_min_tokens)
                     if settings.near_dedup else None)
        self.labels: dict[str, int] = {name: i for i, name in enumerate(settings.label_names or [])}
        self.writers = {s: ShardWriter(out_dir / s, dtype, settings.shard_tokens) for s in SPLITS}
        self.pending: dict[str, list[tuple[Record, bytes]]] = {s: [] for s in SPLITS}

    def run(self, paths: list[Path]) -> None:
        for path in paths:
            raw = checked_auto_format(read_raw_records(path, self.settings.file_type), path, self.rules)
            items = pair_ratings(raw, self.rules, self.ratings)
            if self.settings.workers > 1:
                parsed = parse_and_encode_in_workers(items, self.settings.workers, self.encoder.tokenizer,
                                                     self.encoder.chat_template, self.rules)
            else:
                parsed = ((location, parse_or_reject(location, raw, self.rules), None) for location, raw in items)
            for location, item, encoded in tqdm(parsed, desc=path.name, unit="rec",
                                                disable=not self.settings.progress):
                self.acc.read += 1
                self._admit(location, item, encoded)
        for split in SPLITS:
            self._encode_pending(split)
            self.writers[split].flush()
        self.acc.check()

    def _admit(self, location: str, record: Record | BadRecord, encoded) -> None:
        """``encoded``: the record's (ids, mask) when a worker already tokenized it."""
        if isinstance(record, BadRecord):
            if self.settings.on_bad_record == "error" and record.reason in INVALID_REASONS:
                raise DataError(f"{location}: {record} (data.prepare.on_bad_record=error)") from None
            self.acc.drop(record.reason, location, record.detail)
            return
        digest = record.content_digest()
        key = record.dedup_key()
        if key in self.seen:
            self.acc.drop("exact_duplicate", location, f"same as {self.seen[key]}")
            return
        self.seen[key] = location
        # Not pairs: two pairs of one prompt and one chosen answer differ only in the rejected one.
        near = self.near is not None and record.kind != "preference"
        match = self.near.check_and_add(record.plain_text(), location) if near else None
        if match is not None:
            self.acc.drop("near_duplicate", location, f"matches {match.location} (similarity {match.similarity:.2f})")
            return
        if record.label is not None:
            # Ids in order of first appearance in the input: appending data keeps existing ids.
            self.labels.setdefault(record.label, len(self.labels))
        split = assign_split(digest, self.settings.splits)
        if encoded is not None:
            self._write(split, record, digest, *encoded)
            return
        self.pending[split].append((record, digest))
        if len(self.pending[split]) >= ENCODE_BATCH:
            self._encode_pending(split)

    def _encode_pending(self, split: str) -> None:
        batch, self.pending[split] = self.pending[split], []
        if not batch:
            return
        encoded = self.encoder.encode([r for r, _ in batch])
        for (record, digest), (ids, mask) in zip(batch, encoded, strict=True):
            self._write(split, record, digest, ids, mask)

    def _write(self, split: str, record: Record, digest: bytes, ids: np.ndarray, mask: np.ndarray) -> None:
        max_tokens = self.settings.max_tokens
        if max_tokens is not None and len(ids) > max_tokens:
            if self.settings.overlong == "drop":
                self.acc.drop("too_long", record.location, f"{len(ids):,} tokens > data.prepare.max_tokens={max_tokens:,}")
                return
            ids, mask = ids[:max_tokens], mask[:max_tokens]
            self.acc.truncated += 1
        targets = int(mask.sum())
        if targets == 0:
            self.acc.drop("no_target_tokens", record.location, "nothing left to learn after truncation")
            return
        label = -1 if record.label is None else self.labels[record.label]
        prompt_length = int(np.argmax(mask))  # leading tokens without loss
        key = int.from_bytes(digest[:8], "big")
        self.writers[split].add(ids, mask, prompt_length, label, key)
        self.acc.keep(split, len(ids), targets)


def prepare_dataset(settings: PrepareSection, out_dir: str | Path, *, inputs: list[str] | None = None,
                    tokenizer=None, tokenizer_vocab_size: int = 2048, seq_len: int | None = None) -> PrepareResult:
    """Prepare ``inputs`` (or ``settings.inputs``) into ``out_dir``; a no-op if already done.

    ``tokenizer=None`` trains a byte-level BPE of ``tokenizer_vocab_size`` on the valid records.
    ``seq_len`` (the run's ``data.seq_len``; default its default) sets the ``auto`` length limits.
    """
    out_dir = Path(out_dir)
    settings = resolve_length_limits(settings, seq_len)
    paths = resolve_inputs(inputs if inputs is not None else settings.inputs, settings)
    if not paths:
        raise DataError("no input files: give them on the command line or in data.prepare.inputs")
    if settings.on_bad_record == "error":  # before hashing, tokenizer training or workers: seconds each
        fail_on_first_invalid(paths, settings, record_rules(settings), INVALID_REASONS)
    input_info = [p.info() if isinstance(p, HFInput) else
                  {"path": str(p), "sha256": sha256_file(p), "bytes": p.stat().st_size} for p in paths]
    template, template_source = resolve_chat_template(tokenizer, settings.chat_template)
    tokenizer_spec = tokenizer_fingerprint(tokenizer) if tokenizer is not None else f"trained-bpe:{tokenizer_vocab_size}"
    fingerprint = job_fingerprint(input_info, settings, tokenizer_spec, template)

    cached = _cached_result(out_dir, fingerprint)
    if cached is not None:
        return cached
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / MANIFEST).is_file():
        raise DataError(f"{out_dir} exists and is not a prepared dataset; refusing to overwrite it")

    work = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    make_run_dir(work)  # renamed into place: its 0o750 is the prepared dir's
    try:
        tokenizer = _save_tokenizer(tokenizer, work / "tokenizer", paths, settings, tokenizer_vocab_size)
        dtype = token_dtype(len(tokenizer))
        pipeline = _Pipeline(settings, DocumentEncoder(tokenizer, template), work, dtype)
        pipeline.run(paths)
        if not any(pipeline.acc.kept.values()):
            raise nothing_kept_error(pipeline.acc.dropped, pipeline.acc.examples, pipeline.acc.read)
        report = write_report(pipeline.acc, work)
        pipeline.ratings.write(work)
        manifest = {
            "format_version": FORMAT_VERSION,
            "fingerprint": fingerprint,
            "created_by": "shardtune data prepare",
            "inputs": input_info,
            "settings": settings.model_dump(mode="json", exclude={"progress", "workers"}),
            "tokenizer": {"fingerprint": tokenizer_fingerprint(tokenizer), "vocab_size": len(tokenizer),
                          "path": "tokenizer"},
            "chat_template": {"source": template_source,
                              "fingerprint": hashlib.sha256(template.encode()).hexdigest()},
            "token_dtype": dtype.name,
            "labels": list(pipeline.labels),
            "splits": {
                s: {"documents": pipeline.acc.kept[s], "tokens": pipeline.acc.tokens[s],
                    "target_tokens": pipeline.acc.target_tokens[s], "shards": pipeline.writers[s].shards}
                for s in SPLITS
            },
        }
        (work / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        work.rename(out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return PrepareResult(out_dir, manifest, report, cached=False)


def _cached_result(out_dir: Path, fingerprint: str) -> PrepareResult | None:
    if not (out_dir / MANIFEST).is_file():
        return None
    try:
        manifest = read_manifest(out_dir)
        if manifest.get("fingerprint") != fingerprint:
            return None
        verify_shards(out_dir, manifest)
        report = json.loads((out_dir / "report.json").read_text())
    except (ShardError, OSError, ValueError) as exc:
        print(f"shardtune: rebuilding {out_dir}: {exc}", file=sys.stderr)
        return None
    return PrepareResult(out_dir, manifest, report, cached=True)


def _save_tokenizer(tokenizer, save_dir: Path, paths, settings: PrepareSection, vocab_size: int):
    if tokenizer is not None:
        tokenizer.save_pretrained(str(save_dir))
        return tokenizer
    from shardtune.data.tokenizer import train_tokenizer

    # The label check is left to the pipeline, which counts unknown labels as drops.
    rules = record_rules(settings.model_copy(update={"label_names": None}))

    def texts():
        for path in paths:
            items = checked_auto_format(read_raw_records(path, settings.file_type), path, rules)
            for location, raw in pair_ratings(items, rules):
                if isinstance(raw, BadRecord):
                    continue
                try:
                    yield parse_record(raw, location, rules).plain_text()
                except BadRecord:
                    continue

    return train_tokenizer(texts(), vocab_size, save_dir)
