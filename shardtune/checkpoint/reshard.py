"""``shardtune ckpt reshard CKPT OUT --world-size M``: rewrite a checkpoint as M shard files.

Any world size already loads any checkpoint; rewriting matters when the files themselves
should match the job that reads them (one file per rank on a parallel filesystem, or one
file for a single consumer). M CPU processes (gloo) each read a disjoint 1/M of the tensors
and write them, so no process ever holds the whole checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.checkpoint import FileSystemWriter

from shardtune.checkpoint.manifest import MANIFEST, describe_files, read_manifest
from shardtune.checkpoint.safe_io import (
    SafeFileSystemReader,
    TensorOnlyLoadPlanner,
    check_checkpoint,
    safe_load_metadata,
)
from shardtune.errors import CheckpointError
from shardtune.integrity import fsync_path, write_json_atomic


def _dtypes(path: Path) -> dict[str, torch.dtype]:
    metadata = safe_load_metadata((path / ".metadata").read_bytes())
    return {k: m.properties.dtype for k, m in metadata.state_dict_metadata.items() if hasattr(m, "properties")}


def _worker(rank: int, world: int, port: int, source: str, tmp: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(minutes=30))
    try:
        src = Path(source)
        shapes = read_manifest(src)["tensors"]
        dtypes = _dtypes(src)
        mine = {
            key: torch.empty(shape, dtype=dtypes.get(key, torch.float32))
            for i, (key, shape) in enumerate(sorted(shapes.items())) if i % world == rank
        }
        dcp.load(mine, storage_reader=SafeFileSystemReader(source), planner=TensorOnlyLoadPlanner())
        dcp.save(mine, storage_writer=FileSystemWriter(tmp, sync_files=True))
    finally:
        dist.destroy_process_group()


def reshard(source: Path, out: Path, world_size: int) -> Path:
    manifest = check_checkpoint(source, checksums=True).manifest
    if out.exists():
        raise CheckpointError(f"{out} exists; choose a new directory")
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(world_size, port, str(source), str(tmp)), nprocs=world_size,
                       start_method="spawn", join=True)
    # Everything that is not a tensor shard travels unchanged (RNG streams, trainer state,
    # model config, tokenizer); the manifest is rebuilt for the new files.
    copied = []
    for rel in manifest["files"]:
        if rel.endswith(".distcp") or rel == ".metadata":
            continue
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / rel, tmp / rel)
        copied.append(rel)
    shards = sorted(p.name for p in tmp.glob("*.distcp"))
    new_manifest = dict(manifest)
    new_manifest.update(
        files=describe_files(tmp, [*copied, *shards, ".metadata"]),
        resharded_from={"path": str(source), "world_size": manifest["world_size"]},
        shard_files=world_size,
        created_unix=time.time(),
    )
    new_shapes = {k: list(v.size) for k, v in safe_load_metadata((tmp / ".metadata").read_bytes())
                  .state_dict_metadata.items() if hasattr(v, "size")}
    if new_shapes != manifest["tensors"]:
        missing = sorted(set(manifest["tensors"]) ^ set(new_shapes))
        raise CheckpointError(f"resharding changed the tensors (first difference: {missing[:1]})")
    write_json_atomic(tmp / MANIFEST, new_manifest)
    fsync_path(tmp)
    tmp.rename(out)
    return out


def describe(out: Path) -> str:
    manifest = json.loads((out / MANIFEST).read_text())
    return f"{out}: {manifest['shard_files']} shard file(s), {len(manifest['tensors'])} tensors"
