"""Hugging Face ``datasets`` as an input of ``data prepare`` and of ``data.mixture``.

An input is a Hugging Face dataset when it is ``hf:NAME`` or ``hf:NAME:CONFIG`` (read with
``datasets.load_dataset``: a hub name, the local cache, or a packaged builder such as
``hf:json`` / ``hf:parquet`` with ``data_files``), or a directory written by
``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (read with ``load_from_disk``:
``load_dataset`` refuses those directories since datasets 3).

``datasets`` is only the reader. Its rows become the same raw objects a JSONL line gives, so
validation, cleaning, de-duplication, the content-hash split, tokenization and shard writing
are the ones of file inputs, and the same records give byte-identical shards. A row's location
in the report is ``SOURCE[SPLIT][INDEX]``, its index in that split, instead of ``file:line``.
Rows are read in batches and never gathered: a streamed source (``streaming: true``) is
prepared in one pass without being held in memory.
"""

from __future__ import annotations

import glob
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from shardtune.errors import DataError

HF_PREFIX = "hf:"
# The fields shardtune's four formats read; ``columns`` maps each to a dataset column.
FIELDS = ("messages", "prompt", "completion", "text", "label")
READ_BATCH = 1024


def is_hf_input(spec: str | Path) -> bool:
    """``hf:...``, or a directory that ``save_to_disk`` wrote (decided without importing datasets)."""
    text = str(spec)
    if text.startswith(HF_PREFIX):
        return True
    path = Path(text)
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    )


def map_columns(raw: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
    """Rename the mapped columns to shardtune's fields. A mapped-from column is removed so it
    cannot be read as a field of its own (``{text: prompt}`` must not look like a prompt)."""
    theirs = set(columns.values())
    out = {k: v for k, v in raw.items() if k not in columns and k not in theirs}
    for ours, column in columns.items():
        if column in raw:
            out[ours] = raw[column]
    return out


class HFInput:
    """One Hugging Face dataset input: opened once (lazily), read in batches, fingerprinted."""

    def __init__(self, spec: str, split: str | None = None, data_files=None, streaming: bool = False,
                 columns: dict[str, str] | None = None, progress: bool = False):
        self.spec = spec
        self.columns = dict(columns or {})
        self.split = split
        self.data_files = data_files
        self.streaming = streaming
        self.progress = progress
        self._splits: list[tuple[str | None, Any]] | None = None

    @property
    def name(self) -> str:
        return self.spec if self.spec.startswith(HF_PREFIX) else Path(self.spec).name

    @property
    def from_disk(self) -> bool:
        return not self.spec.startswith(HF_PREFIX)

    def __str__(self) -> str:  # how messages and the report name this input
        return self.spec

    def __repr__(self) -> str:
        return f"HFInput({self.spec!r}, split={self.split!r})"

    # -- opening ---------------------------------------------------------------------------

    def splits(self) -> list[tuple[str | None, Any]]:
        """``(split name, dataset)`` in read order: the one asked for, or every split of a
        DatasetDict in its own order (shardtune re-splits by content hash either way)."""
        if self._splits is None:
            datasets = _import_datasets(self.progress)
            opened = self._open_from_disk(datasets) if self.from_disk else self._load(datasets)
            if isinstance(opened, (datasets.DatasetDict, datasets.IterableDatasetDict)):
                if self.split is not None:
                    if self.split not in opened:
                        raise DataError(f"{self.spec} has no split {self.split!r} (splits: {', '.join(opened)})")
                    self._splits = [(self.split, opened[self.split])]
                else:
                    self._splits = list(opened.items())
            else:
                self._splits = [(self.split, opened)]
        return self._splits

    def _open_from_disk(self, datasets):
        if self.streaming:
            raise DataError(f"{self.spec}: a save_to_disk directory is memory-mapped, not streamed; "
                            "remove data.prepare.hf.streaming")
        if self.data_files is not None:
            raise DataError(f"{self.spec}: data_files is for hf:json / hf:parquet / hf:csv inputs, "
                            "not for a save_to_disk directory")
        opened = datasets.load_from_disk(self.spec)
        if self.split is not None and isinstance(opened, datasets.Dataset):
            raise DataError(f"{self.spec} holds one Dataset (no splits); remove data.prepare.hf.split={self.split}")
        return opened

    def _load(self, datasets):
        name, _, config = self.spec[len(HF_PREFIX):].partition(":")
        if not name:
            raise DataError(f"{self.spec!r}: write hf:NAME or hf:NAME:CONFIG")
        try:
            return datasets.load_dataset(name, config or None, split=self.split, data_files=self.data_files,
                                         streaming=self.streaming)
        except ConnectionError as exc:
            raise DataError(
                f"{self.spec}: not in the local Hugging Face datasets cache, and the Hub cannot be reached "
                f"({'HF_HUB_OFFLINE=1' if os.environ.get('HF_HUB_OFFLINE') == '1' else 'no network'}): "
                f"download it once with network access, or give a local copy (save_to_disk directory, "
                f"hf:json with data_files). {exc}"
            ) from None
        except (FileNotFoundError, ValueError) as exc:
            # datasets' DatasetNotFoundError, a missing data file, an unknown split or config.
            raise DataError(f"{self.spec}: {type(exc).__name__}: {exc}") from None

    # -- reading ---------------------------------------------------------------------------

    def rows(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """``(location, raw row)`` for every row of every split read, in order, columns mapped."""
        columns = self.columns
        for split, ds in self.splits():
            names = ds.column_names  # None for some streamed sources: not known before reading
            if columns and names is not None:
                missing = {ours: c for ours, c in columns.items() if c not in names}
                if missing:
                    raise DataError(
                        f"{self.spec}{_split_tag(split)}: data.prepare.columns maps "
                        + ", ".join(f"{ours} to {c!r}" for ours, c in missing.items())
                        + f", which is not a column (columns: {', '.join(names)})"
                    )
            labels = _class_label_names(ds)
            where = f"{self.spec}{_split_tag(split)}"
            index = 0
            for batch in ds.iter(batch_size=READ_BATCH):
                keys = list(batch)
                for values in zip(*(batch[k] for k in keys), strict=True):
                    # Rows of a dataset carry every column; a column a row lacks is None there,
                    # which is what an absent key is in a JSONL line.
                    row = {k: v for k, v in zip(keys, values, strict=True) if v is not None}
                    for key, names_of in labels.items():
                        if isinstance(row.get(key), int) and 0 <= row[key] < len(names_of):
                            row[key] = names_of[row[key]]
                    yield f"{where}[{index}]", map_columns(row, columns) if columns else row
                    index += 1

    # -- fingerprint -----------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """What the preparation fingerprint records for this input (cf. a file's path and sha256)."""
        info: dict[str, Any] = {"path": self.spec, "split": self.split}
        if self.from_disk:
            info["kind"] = "datasets.save_to_disk"
            info["sha256"], info["bytes"] = _tree_sha256(Path(self.spec))
            return info
        info.update(kind="datasets.load_dataset", data_files=self.data_files, streaming=self.streaming)
        local = _local_files(self.data_files)
        if local:
            info["data_files_sha256"] = {str(p): _file_sha256(p) for p in local}
        if not self.streaming:
            info["fingerprints"] = {str(split): getattr(ds, "_fingerprint", None) for split, ds in self.splits()}
        elif not local:
            # A streamed remote dataset cannot be hashed without reading it all: never "unchanged".
            info["unverifiable"] = os.urandom(8).hex()
        return info


def open_hf_input(spec: str, settings) -> HFInput:
    """A ``data prepare`` input from ``data.prepare.hf`` and ``data.prepare.columns``."""
    hf = settings.hf
    return HFInput(spec, split=hf.split, data_files=hf.data_files, streaming=hf.streaming,
                   columns=settings.columns, progress=settings.progress)


def read_mixture_records(entry) -> list[dict[str, str]]:
    """A ``data.mixture`` entry's records from a dataset (causal LM: prompt/completion or text)."""
    source = HFInput(entry.path, split=entry.split, data_files=entry.data_files, columns=entry.columns)
    records = []
    for location, record in source.rows():
        has_pair = isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str)
        if not has_pair and not isinstance(record.get("text"), str):
            raise DataError(f"{location}: needs string fields 'prompt' and 'completion', or 'text' "
                            f"(fields: {', '.join(sorted(record)) or 'none'}; map columns with columns)")
        records.append(record)
    return records


# --------------------------------------------------------------------------------------


def _import_datasets(progress: bool):
    import datasets

    if not progress:
        datasets.disable_progress_bars()
    return datasets


def _split_tag(split: str | None) -> str:
    return f"[{split}]" if split is not None else ""


def _class_label_names(ds) -> dict[str, list[str]]:
    """Columns stored as ``ClassLabel`` ids: written as their names, as a JSONL label would be."""
    features = getattr(ds, "features", None) or {}
    return {k: list(f.names) for k, f in features.items() if type(f).__name__ == "ClassLabel"}


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _tree_sha256(root: Path) -> tuple[str, int]:
    """One digest over every file of a directory (relative names and contents), and its bytes."""
    digest, total = hashlib.sha256(), 0
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(root)}\0{_file_sha256(path)}\n".encode())
        total += path.stat().st_size
    return digest.hexdigest(), total


def _local_files(data_files) -> list[Path]:
    """The local files ``data_files`` names (globs expanded); remote URLs are left out."""
    if data_files is None:
        return []
    if isinstance(data_files, str):
        patterns = [data_files]
    elif isinstance(data_files, dict):
        patterns = [p for v in data_files.values() for p in ([v] if isinstance(v, str) else v)]
    else:
        patterns = list(data_files)
    found: list[Path] = []
    for pattern in patterns:
        if "://" in pattern:
            continue
        for match in sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]:
            if Path(match).is_file() and Path(match) not in found:
                found.append(Path(match))
    return found
