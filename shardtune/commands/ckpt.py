"""``shardtune ckpt ls|inspect|verify|export``."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from shardtune.checkpoint.manifest import (
    LATEST,
    MANIFEST,
    STEP_DIR,
    checkpoints_root,
    list_checkpoints,
    read_latest,
    resolve_checkpoint,
)
from shardtune.errors import CheckpointError, UnsafeCheckpointError

_WHERE = "a run directory, its checkpoints directory, its latest file, or a step directory"


def add_parser(sub) -> None:
    p = sub.add_parser("ckpt", help="list, inspect, verify and export checkpoints")
    ck = p.add_subparsers(dest="ckpt_command", required=True)
    p_ls = ck.add_parser("ls", help="list the checkpoints under a directory")
    p_ls.add_argument("root", type=Path, help=_WHERE)
    p_ls.add_argument("--checksums", action="store_true", help="also check every sha256 (reads every byte)")
    p_inspect = ck.add_parser("inspect", help="metadata and tensor shapes of one checkpoint")
    p_inspect.add_argument("path", type=Path, help=_WHERE)
    p_inspect.add_argument("--all", action="store_true", help="list every tensor, not the first 20")
    p_verify = ck.add_parser("verify", help="every check a load makes: sha256, safe metadata, tensors only, JSON")
    p_verify.add_argument("path", type=Path, help="a step directory or latest (that one), or a checkpoints or "
                          "run directory (all of them)")
    p_reshard = ck.add_parser("reshard", help="rewrite a checkpoint as M shard files (offline, CPU)")
    p_reshard.add_argument("path", type=Path, help=_WHERE)
    p_reshard.add_argument("out", type=Path)
    p_reshard.add_argument("--world-size", type=int, required=True, help="number of shard files to write")
    p_export = ck.add_parser("export", help="write a Hugging Face directory (safetensors)")
    p_export.add_argument("path", type=Path, help=_WHERE)
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


def check_checkpoint(path: Path, **checks):
    from shardtune.checkpoint.safe_io import check_checkpoint as check  # imports torch: only when used

    return check(path, **checks)


def _ls(args) -> int:
    root = checkpoints_root(args.root)
    try:
        latest = read_latest(root)
    except CheckpointError as exc:
        latest = None
        print(f"latest: unusable ({exc})")
    rows = []
    for c in list_checkpoints(root):
        # Sizes and every load check but the hashes (those read every byte: `ckpt verify`).
        try:
            checked = check_checkpoint(c.path, checksums=args.checksums)
            manifest = checked.manifest
            rows.append((c.path.name, c.step, manifest.get("strategy", "?"), manifest.get("world_size", "?"),
                         _human(c.size_bytes()), "ok (sha256)" if args.checksums else "sizes ok"))
        except UnsafeCheckpointError as exc:
            rows.append((c.path.name, c.step, "?", "?", "?", f"UNSAFE: {exc}"))
        except CheckpointError as exc:
            rows.append((c.path.name, c.step, "?", "?", "?", f"INVALID: {exc}"))
    if not rows:
        print(f"no checkpoints under {root}")
        return 0
    print(f"{'checkpoint':<16} {'step':>8} {'strategy':>8} {'ranks':>5} {'size':>11}  status")
    for name, step, strategy, ranks, size, status in rows:
        marker = "  <- latest" if name == latest else ""
        print(f"{name:<16} {step:>8} {strategy!s:>8} {ranks!s:>5} {size:>11}  {status}{marker}")
    return 0


def _inspect(args) -> int:
    path = resolve_checkpoint(args.path)
    checked = check_checkpoint(path, checksums=False)  # what a load would refuse, inspect refuses
    manifest, state = checked.manifest, checked.trainer_state
    tokens = state.get("tokens_seen")
    print(f"checkpoint   {path}")
    print(f"step         {state.get('step', '?')}  (tokens seen {f'{tokens:,}' if isinstance(tokens, int) else '?'})")
    print(f"written by   {manifest.get('strategy', '?')} on {manifest.get('world_size', '?')} rank(s); "
          f"versions {state.get('versions', '?')}")
    print(f"data cursor  {state.get('loader', '?')}")
    print(f"files        {len(manifest['files'])}, {_human(sum(f['bytes'] for f in manifest['files'].values()))}")
    tensors = manifest["tensors"]
    print(f"tensors      {len(tensors)}")
    shown = tensors.items() if args.all else list(tensors.items())[:20]
    for key, shape in shown:
        print(f"  {key:<70} {shape}")
    if not args.all and len(tensors) > 20:
        print(f"  ... {len(tensors) - 20} more (--all)")
    return 0


def _verify_targets(path: Path) -> list[Path]:
    """One checkpoint for a step directory or a ``latest`` file; all of them for a checkpoints
    or run directory."""
    if path.name == LATEST or (path / MANIFEST).is_file() or STEP_DIR.match(path.name):
        return [resolve_checkpoint(path)]
    return [c.path for c in list_checkpoints(checkpoints_root(path))] or [resolve_checkpoint(path)]


def _verify(args) -> int:
    failed = 0
    for path in _verify_targets(args.path):
        try:
            checked = check_checkpoint(path, checksums=True, tensors=True)
            print(f"ok       {path} ({len(checked.manifest['files'])} files: sha256, metadata, "
                  f"{len(checked.metadata.storage_data)} tensor entries)")
        except UnsafeCheckpointError as exc:
            failed += 1
            print(f"UNSAFE   {exc}")
        except CheckpointError as exc:
            failed += 1
            print(f"CORRUPT  {exc}")
    if failed:
        raise CheckpointError(f"{failed} checkpoint(s) failed verification (see above)")
    return 0


def _export(args) -> int:
    from shardtune.checkpoint.export import export_hf

    path = resolve_checkpoint(args.path)
    check_checkpoint(path, checksums=True)
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
