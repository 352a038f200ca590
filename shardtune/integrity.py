"""Checksums and crash-safe writes shared by checkpoints and prepared data shards.

A sha256 detects corruption (a torn write, a flipped bit, a truncated copy), not tampering: anyone
who can change a file can rewrite its manifest too. What keeps a hostile checkpoint from running
code is the loader (``checkpoint/safe_io.py``), not these hashes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_json(obj) -> str:
    """A digest of a JSON-able value that does not depend on key order."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, payload: dict) -> None:
    """Write, fsync, then rename: a reader sees the old file or the whole new one, never half."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as fh:
        json.dump(payload, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_json_object(path: Path, error: type[Exception], what: str = "file") -> dict:
    """The one way shardtune reads a JSON file it did not just write (checkpoint state, RNG
    streams, manifests, run results): strict UTF-8, a JSON object, or ``error`` naming the file.

    JSON can hold no code, so a pickle (or anything else) put where a JSON file belongs is
    refused here, with the file named, instead of surfacing as a UnicodeDecodeError deep
    inside whichever command read it.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise error(f"{path}: {what} missing") from None
    except OSError as exc:
        raise error(f"{path}: cannot read {what} ({exc.strerror or exc})") from None
    try:
        value = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise error(f"{path}: {what} is not JSON (not UTF-8 text: byte {exc.start} is {raw[exc.start]:#04x})") from None
    except json.JSONDecodeError as exc:
        raise error(f"{path}: {what} is not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if not isinstance(value, dict):
        raise error(f"{path}: {what} is not a JSON object but a {type(value).__name__}")
    return value
