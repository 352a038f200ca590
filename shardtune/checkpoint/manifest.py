"""Checkpoint directories on disk: naming, manifest, checksums, the ``latest`` pointer.

A checkpoint is valid only if its directory has its final name (the rename is the commit)
and every file listed in ``manifest.json`` exists with the recorded size and sha256.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from shardtune.errors import CheckpointError
from shardtune.integrity import fsync_path, sha256_file

MANIFEST = "manifest.json"
LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def describe_files(root: Path, relative_paths: list[str]) -> dict[str, dict]:
    return {
        rel: {"bytes": (root / rel).stat().st_size, "sha256": sha256_file(root / rel)}
        for rel in relative_paths
    }


def write_latest(root: Path, name: str) -> None:
    tmp = root / (LATEST + ".tmp")
    with tmp.open("w") as fh:
        fh.write(name + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, root / LATEST)
    fsync_path(root)


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    step: int

    @property
    def manifest(self) -> dict:
        return read_manifest(self.path)

    def size_bytes(self) -> int:
        return sum(f["bytes"] for f in self.manifest["files"].values())


def read_manifest(path: Path) -> dict:
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST} (an incomplete save?)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{manifest_path}: not valid JSON ({exc})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{manifest_path}: format version {manifest.get('format_version')!r}, "
            f"this shardtune reads {FORMAT_VERSION}"
        )
    return manifest


def verify_checkpoint(path: Path, checksums: bool = True) -> dict:
    """Raise ``CheckpointError`` naming the first bad file; return the manifest if all is well."""
    manifest = read_manifest(path)
    for rel, expected in sorted(manifest["files"].items()):
        file = path / rel
        if not file.is_file():
            raise CheckpointError(f"{file}: missing (listed in {path / MANIFEST})")
        size = file.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(f"{file}: {size} bytes, the manifest says {expected['bytes']} (truncated?)")
        if checksums and sha256_file(file) != expected["sha256"]:
            raise CheckpointError(f"{file}: sha256 mismatch (corrupted)")
    return manifest


def list_checkpoints(root: Path) -> list[CheckpointInfo]:
    """Committed checkpoints, oldest first. Temporary (uncommitted) directories are ignored."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir():
            found.append(CheckpointInfo(child, int(match.group(1))))
    return sorted(found, key=lambda c: c.step)


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint directory, or a checkpoints root whose ``latest`` names one."""
    if (path / MANIFEST).is_file():
        return path
    if (path / LATEST).is_file():
        return path / (path / LATEST).read_text().strip()
    committed = list_checkpoints(path)
    if committed:
        return committed[-1].path
    raise CheckpointError(f"{path}: neither a checkpoint nor a directory of checkpoints")


def newest_valid_checkpoint(root: Path, checksums: bool = True) -> Path | None:
    """The newest committed checkpoint that verifies; each one skipped is reported by name."""
    for candidate in reversed(list_checkpoints(root)):
        try:
            verify_checkpoint(candidate.path, checksums=checksums)
            return candidate.path
        except CheckpointError as exc:
            print(f"shardtune: skipping checkpoint: {exc}", file=sys.stderr, flush=True)
    return None
