"""Reading input files (JSONL, CSV/TSV, Parquet) as ``(file:line, raw object or BadRecord)``.

A line or row that cannot even be read as an object (blank, undecodable, malformed) comes out
as a ``BadRecord`` in its place, so the report counts it with the rest; data/records.py turns
the objects into records.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from shardtune.data.records import BadRecord
from shardtune.errors import DataError

RawItem = tuple[str, "dict[str, Any] | BadRecord"]


def read_raw_records(path: Path, file_type: str = "auto") -> Iterator[RawItem]:
    if hasattr(path, "rows"):  # a Hugging Face dataset input (data/hf_source.HFInput)
        yield from path.rows()
        return
    check_input_file(path)
    kind = file_type if file_type != "auto" else _file_type_from_suffix(path)
    if kind == "jsonl":
        yield from _read_jsonl(path)
    elif kind == "csv":
        yield from _read_csv(path)
    else:
        yield from _read_parquet(path)


def check_input_file(path: Path) -> None:
    if path.is_dir():
        raise DataError(f"input {path} is a directory: give the files in it (e.g. '{path}/*.jsonl')")
    if not path.is_file():
        raise DataError(f"input file not found: {path}")


def _file_type_from_suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffix in (".csv", ".tsv"):
        return "csv"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    raise ValueError(f"{path}: cannot tell the file type from its suffix; set data.prepare.file_type")


def _read_jsonl(path: Path) -> Iterator[RawItem]:
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            where = f"{path}:{lineno}"
            if not raw.strip():
                yield where, BadRecord("blank_line")
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield where, BadRecord("undecodable_bytes", str(exc))
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                yield where, BadRecord("malformed_json", str(exc))
                continue
            yield where, obj if isinstance(obj, dict) else BadRecord("not_an_object", type(obj).__name__)


def _read_csv(path: Path) -> Iterator[RawItem]:
    # surrogateescape keeps undecodable bytes visible as lone surrogates, so one bad row
    # is dropped instead of the whole file failing to decode.
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with path.open("r", encoding="utf-8", errors="surrogateescape", newline="") as fh:
        reader = csv.DictReader(fh, delimiter=delimiter)
        # Read the header first: before it, line_num is 0 and the first row would be "line 1".
        if reader.fieldnames is None:
            return
        start_line = reader.line_num + 1
        for row in reader:
            where = f"{path}:{start_line}"
            start_line = reader.line_num + 1
            if None in row or any(v is None for v in row.values()):
                yield where, BadRecord("malformed_csv", "wrong number of columns")
                continue
            yield where, {k: _maybe_json_list(v) for k, v in row.items()}


def _maybe_json_list(value: str) -> Any:
    # CSV has no nested types: a chat's ``messages`` column holds a JSON list.
    if value.startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _read_parquet(path: Path) -> Iterator[RawItem]:
    import pyarrow.parquet as pq

    row = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
        for obj in batch.to_pylist():
            row += 1
            yield f"{path}:row{row}", obj
