"""Command line: ``shardtune train|launch|config show``."""

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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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

    from shardtune.train.loop import NonFiniteLossError, train

    try:
        train(cfg)
    except NonFiniteLossError as exc:
        print(f"shardtune: stopped: {exc}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
