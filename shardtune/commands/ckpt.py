"""``shardtune ckpt ls|inspect|verify|export``."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from shardtune.checkpoint.manifest import (
    LATEST,
    TRAINER_STATE,
    list_checkpoints,
    resolve_checkpoint,
    verify_checkpoint,
)
from shardtune.errors import CheckpointError


def add_parser(sub) -> None:
    p = sub.add_parser("ckpt", help="list, inspect, verify and export checkpoints")
    ck = p.add_subparsers(dest="ckpt_command", required=True)
    p_ls = ck.add_parser("ls", help="list the checkpoints under a directory")
    p_ls.add_argument("root", type=Path)
    p_inspect = ck.add_parser("inspect", help="metadata and tensor shapes of one checkpoint")
    p_inspect.add_argument("path", type=Path)
    p_inspect.add_argument("--all", action="store_true", help="list every tensor, not the first 20")
    p_verify = ck.add_parser("verify", help="check every file against the manifest's sha256")
    p_verify.add_argument("path", type=Path, help="a checkpoint, or a directory of them (verifies all)")
    p_reshard = ck.add_parser("reshard", help="rewrite a checkpoint as M shard files (offline, CPU)")
    p_reshard.add_argument("path", type=Path)
    p_reshard.add_argument("out", type=Path)
    p_reshard.add_argument("--world-size", type=int, required=True, help="number of shard files to write")
    p_export = ck.add_parser("export", help="write a Hugging Face directory (safetensors)")
    p_export.add_argument("path", type=Path)
    p_export.add_argument("out", type=Path)
    p_export.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p_export.add_argument("--lora", choices=["merged", "adapters"],
                          help="LoRA runs: merge adapters into the weights or write adapters only "
                          "(default: finetune.lora.export of the run)")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def run(args: argparse.Namespace, extra: list[str], parser) -> int:
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return _COMMANDS[args.ckpt_command](args)


def _ls(args) -> int:
    latest_file = args.root / LATEST
    latest = latest_file.read_text().strip() if latest_file.is_file() else None
    rows = []
    for c in list_checkpoints(args.root):
        try:
            manifest = verify_checkpoint(c.path, checksums=False)
            rows.append((c.path.name, c.step, manifest["strategy"], manifest["world_size"],
                         _human(c.size_bytes()), "ok"))
        except CheckpointError as exc:
            rows.append((c.path.name, c.step, "?", "?", "?", f"INVALID: {exc}"))
    if not rows:
        print(f"no checkpoints under {args.root}")
        return 0
    print(f"{'checkpoint':<16} {'step':>8} {'strategy':>8} {'ranks':>5} {'size':>11}  status")
    for name, step, strategy, ranks, size, status in rows:
        marker = "  <- latest" if name == latest else ""
        print(f"{name:<16} {step:>8} {strategy:>8} {ranks!s:>5} {size:>11}  {status}{marker}")
    return 0


def _inspect(args) -> int:
    path = resolve_checkpoint(args.path)
    manifest = verify_checkpoint(path, checksums=False)
    state = json.loads((path / TRAINER_STATE).read_text())
    print(f"checkpoint   {path}")
    print(f"step         {state['step']}  (tokens seen {state['tokens_seen']:,})")
    print(f"written by   {manifest['strategy']} on {manifest['world_size']} rank(s); versions {state['versions']}")
    print(f"data cursor  {state['loader']}")
    print(f"files        {len(manifest['files'])}, {_human(sum(f['bytes'] for f in manifest['files'].values()))}")
    tensors = manifest["tensors"]
    print(f"tensors      {len(tensors)}")
    shown = tensors.items() if args.all else list(tensors.items())[:20]
    for key, shape in shown:
        print(f"  {key:<70} {shape}")
    if not args.all and len(tensors) > 20:
        print(f"  ... {len(tensors) - 20} more (--all)")
    return 0


def _verify(args) -> int:
    targets = [c.path for c in list_checkpoints(args.path)] or [resolve_checkpoint(args.path)]
    failed = 0
    for path in targets:
        try:
            manifest = verify_checkpoint(path, checksums=True)
            print(f"ok       {path} ({len(manifest['files'])} files)")
        except CheckpointError as exc:
            failed += 1
            print(f"CORRUPT  {exc}")
    return 1 if failed else 0


def _export(args) -> int:
    from shardtune.checkpoint.export import export_hf

    path = resolve_checkpoint(args.path)
    verify_checkpoint(path, checksums=True)
    adapters = None if args.lora is None else args.lora == "adapters"
    out = export_hf(path, args.out, dtype=args.dtype, adapters_only=adapters)
    print(f"exported {path} -> {out} (load with from_pretrained({str(out)!r}))")
    return 0


def _reshard(args) -> int:
    from shardtune.checkpoint.reshard import describe, reshard

    path = resolve_checkpoint(args.path)
    start = time.perf_counter()
    out = reshard(path, args.out, args.world_size)
    print(f"resharded {path} -> {describe(out)} in {time.perf_counter() - start:.1f} s")
    return 0


_COMMANDS = {"ls": _ls, "inspect": _inspect, "verify": _verify, "export": _export, "reshard": _reshard}
