"""Command line: ``shardtune train|launch|config show|data prepare``."""

from __future__ import annotations

import argparse
import sys

from shardtune.config import ConfigError, dump_config, load_config


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default=None, help="YAML run config (default: the embedded CPU demo)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4 distributed.strategy=fsdp")


def _split_config_and_overrides(args) -> tuple[str | None, list[str]]:
    # ``shardtune train train.lr=1`` means the default config with one override.
    if args.config is not None and "=" in args.config:
        return None, [args.config, *args.overrides]
    return args.config, list(args.overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardtune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p_train = sub.add_parser("train", help="run this process's share of a job (under torchrun, or alone)")
    _add_config_args(p_train)

    p_launch = sub.add_parser("launch", help="spawn torchrun for a job on this machine")
    _add_config_args(p_launch)
    p_launch.add_argument("--nproc", type=int, default=1, help="ranks on this node")
    p_launch.add_argument("--nnodes", type=int, default=1)
    p_launch.add_argument("--node-rank", type=int, default=0)
    p_launch.add_argument("--master", default="127.0.0.1", help="address of node 0 (multi-node)")
    p_launch.add_argument("--port", type=int, default=29500)
    p_launch.add_argument("--dry-run", action="store_true", help="print the torchrun command only")

    p_config = sub.add_parser("config", help="inspect configs")
    config_sub = p_config.add_subparsers(dest="config_command", required=True)
    p_show = config_sub.add_parser("show", help="print the resolved config")
    _add_config_args(p_show)

    p_data = sub.add_parser("data", help="prepare datasets")
    data_sub = p_data.add_subparsers(dest="data_command", required=True)
    p_prepare = data_sub.add_parser(
        "prepare",
        help="clean, validate, split and tokenize files into checksummed shards",
        description="shardtune data prepare [CONFIG.yaml] [INPUT ...] [key=value ...] --out DIR. "
        "Inputs are JSONL/CSV/Parquet files or globs (default: data.prepare.inputs); options come "
        "from data.prepare.* (e.g. data.prepare.max_tokens=2048 data.prepare.on_bad_record=error). "
        "Writes shards, manifest.json, report.json/.txt and token_lengths.png; a re-run with the "
        "same inputs and settings does nothing.",
    )
    p_prepare.add_argument("items", nargs="*", metavar="CONFIG_OR_INPUT_OR_OVERRIDE",
                           help="a .yaml run config, input files/globs, and dotted key=value overrides")
    p_prepare.add_argument("--out", help="output directory (default: data.prepared_dir)")
    p_prepare.add_argument("--tokenizer", help="tokenizer dir or hub id (default: tokenizer.name_or_path; "
                           "if unset, a byte-level BPE of tokenizer.vocab_size is trained on the inputs)")
    p_prepare.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come after options (``launch cfg --nproc 2 train.lr=1``), which argparse
    # leaves unparsed once the positionals are filled: collect those, reject anything else.
    args, extra = parser.parse_known_args(argv)
    if args.command == "data":
        from shardtune.data.prepare import run_prepare_command

        return run_prepare_command(args, extra, parser)
    stray = [a for a in extra if "=" not in a or a.startswith("-")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    args.overrides = [*getattr(args, "overrides", []), *extra]
    config_path, overrides = _split_config_and_overrides(args)
    try:
        cfg = load_config(config_path, overrides)
    except ConfigError as exc:
        print(f"shardtune: {exc}", file=sys.stderr)
        return 2

    if args.command == "config":
        print(dump_config(cfg), end="")
        return 0

    if args.command == "launch":
        from shardtune.launch.local import run_torchrun, torchrun_command

        cmd = torchrun_command(
            config_path, overrides, nproc=args.nproc, nnodes=args.nnodes,
            node_rank=args.node_rank, master_addr=args.master, master_port=args.port,
        )
        if args.dry_run:
            print(" ".join(cmd))
            return 0
        return run_torchrun(cmd)

    from shardtune.checkpoint.manifest import CheckpointError
    from shardtune.train.loop import NonFiniteLossError, train
    from shardtune.train.signals import PREEMPTED_EXIT_CODE, Preempted

    try:
        train(cfg)
    except NonFiniteLossError as exc:
        print(f"shardtune: stopped: {exc}", file=sys.stderr)
        return 3
    except Preempted as exc:
        print(f"shardtune: {exc}; rerun the same command to resume", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    except CheckpointError as exc:
        print(f"shardtune: checkpoint error: {exc}", file=sys.stderr)
        return 4
    return 0


if __name__ == "__main__":
    sys.exit(main())
