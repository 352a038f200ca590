"""Checkpoint directories on disk: naming, manifest, checksums, the ``latest`` pointer.

A checkpoint is valid only if its directory has its final name (the rename is the commit)
and every file listed in ``manifest.json`` exists with the recorded size and sha256.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from shardtune.errors import CheckpointError, UnsafeCheckpointError
from shardtune.integrity import fsync_path, read_json_object, sha256_file

MANIFEST = "manifest.json"
LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
FORMAT_VERSION = 1
STEP_DIR = re.compile(r"^step-(\d{8})$")
# What "this checkpoint cannot be used" raises: broken, or refused as unsafe.
CHECKPOINT_ERRORS = (CheckpointError, UnsafeCheckpointError)


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
    manifest = read_json_object(manifest_path, CheckpointError, "manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{manifest_path}: format version {manifest.get('format_version')!r}, "
            f"this shardtune reads {FORMAT_VERSION}"
        )
    files, tensors = manifest.get("files"), manifest.get("tensors")
    bad = next((rel for rel, entry in files.items() if not _plain_relative(rel) or not isinstance(entry, dict)
                or type(entry.get("bytes")) is not int or not isinstance(entry.get("sha256"), str)), None) \
        if isinstance(files, dict) else "(not a table)"
    if bad is not None:
        raise CheckpointError(f"{manifest_path}: malformed file entry {bad!r} (a file of this directory "
                              "with its bytes and sha256)")
    if not isinstance(tensors, dict) or not all(
            isinstance(shape, list) and all(type(n) is int for n in shape) for shape in tensors.values()):
        raise CheckpointError(f"{manifest_path}: malformed 'tensors' table")
    return manifest


def _plain_relative(rel: str) -> bool:
    """A path inside the checkpoint directory: relative, normalised, no ``..``."""
    parts = PurePosixPath(rel).parts
    return bool(parts) and str(PurePosixPath(rel)) == rel and not rel.startswith("/") and ".." not in parts


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
        match = STEP_DIR.match(child.name)
        if match and child.is_dir():
            found.append(CheckpointInfo(child, int(match.group(1))))
    return sorted(found, key=lambda c: c.step)


def read_latest(root: Path) -> str | None:
    """The step directory ``root/latest`` names (``None`` without one). Only a ``step-NNNNNNNN``
    name is accepted: a pointer elsewhere (``/etc``, ``../other-run``) is never followed, and
    binary garbage is an error naming the file, not a UnicodeDecodeError."""
    file = root / LATEST
    if not file.is_file():
        return None
    try:
        name = file.read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError:
        raise CheckpointError(f"{file}: not a checkpoint name (binary content)") from None
    except OSError as exc:
        raise CheckpointError(f"{file}: cannot read ({exc.strerror})") from None
    if not STEP_DIR.match(name):
        raise CheckpointError(f"{file}: names {name[:80]!r}, not a step-NNNNNNNN directory of {root} "
                              "(a pointer outside the checkpoints directory is never followed)")
    return name


def checkpoints_root(path: Path) -> Path:
    """The directory holding the ``step-*`` directories, given that directory, a run directory
    (its ``checkpoints/``), a ``latest`` file, or a step directory (its parent)."""
    path = Path(path)
    if path.name == LATEST and path.is_file():
        return path.parent
    if STEP_DIR.match(path.name) and path.is_dir():
        return path.parent
    if not list_checkpoints(path) and not (path / LATEST).is_file() and (path / "checkpoints").is_dir():
        return path / "checkpoints"
    return path


def resolve_checkpoint(path: Path) -> Path:
    """One checkpoint directory from a step directory, a checkpoints directory or its ``latest``
    file (the one ``latest`` names, else the newest), or a run directory (its ``checkpoints/``)."""
    path = Path(path)
    if (path / MANIFEST).is_file() or (STEP_DIR.match(path.name) and path.is_dir()):
        return path
    root = checkpoints_root(path)
    name = read_latest(root)
    if name is not None:
        if not (root / name).is_dir():
            raise CheckpointError(f"{root / LATEST} names {name}, which does not exist")
        return root / name
    committed = list_checkpoints(root)
    if committed:
        return committed[-1].path
    raise CheckpointError(f"{path}: neither a checkpoint nor a directory of checkpoints "
                          "(nor a run directory with a checkpoints/ directory)")


def newest_valid_checkpoint(root: Path, checksums: bool = True, *, fresh_if_all_invalid: bool = True,
                            check=None) -> Path | None:
    """The newest committed checkpoint that passes every load check; each one skipped is
    reported by name. ``None`` when there is none at all (a fresh start). When there are
    checkpoints but none is valid, a run that asked to resume is refused (a silent start at
    step 0 would then delete the evidence and the user's work) unless ``fresh_if_all_invalid``."""
    # The loader passes safe_io.check_checkpoint (every load check); alone, this module checks files.
    check = check or (lambda path, sums: verify_checkpoint(path, checksums=sums))
    committed = list_checkpoints(root)
    skipped = []
    for candidate in reversed(committed):
        try:
            check(candidate.path, checksums)
            return candidate.path
        except CHECKPOINT_ERRORS as exc:
            skipped.append(str(exc))
            print(f"shardtune: skipping checkpoint: {exc}", file=sys.stderr, flush=True)
    if skipped and not fresh_if_all_invalid:
        raise CheckpointError(
            f"all {len(skipped)} checkpoint(s) under {root} are invalid (newest: {skipped[0]}); refusing to "
            "start over at step 0 next to them. Repair or move them away, or set "
            "checkpoint.resume=auto-or-fresh to start fresh anyway"
        )
    if skipped:
        print(f"shardtune: all {len(skipped)} checkpoint(s) under {root} are invalid; starting fresh "
              "(checkpoint.resume=auto-or-fresh)", file=sys.stderr, flush=True)
    return None


def retention_victims(committed: list[CheckpointInfo], *, newest: int, keep_last: int, keep_every: int,
                      pinned: set[int], is_valid) -> list[CheckpointInfo]:
    """What retention deletes: valid checkpoints beyond the ``keep_last`` most recent valid ones,
    never ``newest`` (the one just committed, which ``latest`` names), a pinned step or a
    ``keep_every`` multiple. Invalid ones are neither counted (a corrupt directory numbered
    higher than a fresh run's checkpoints would otherwise push each new one out) nor deleted
    (they are the evidence of what went wrong)."""
    valid = [c for c in committed if c.step == newest or is_valid(c)]
    keep = {newest, *pinned} | {c.step for c in valid[-keep_last:]}
    if keep_every:
        keep |= {c.step for c in valid if c.step % keep_every == 0}
    return [c for c in valid if c.step not in keep]
