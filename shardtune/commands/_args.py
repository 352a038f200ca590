"""Argument handling shared by the verbs that take a run config and dotted overrides."""

from __future__ import annotations

import argparse


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default=None, help="YAML run config (default: the embedded CPU demo)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4 distributed.strategy=fsdp")


def reject_stray(parser: argparse.ArgumentParser, extra: list[str]) -> None:
    stray = [a for a in extra if "=" not in a or a.startswith("-")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")


def config_and_overrides(args, extra: list[str]) -> tuple[str | None, list[str]]:
    """Overrides may come after options (``launch cfg --nproc 2 train.lr=1``), which argparse leaves
    unparsed once the positionals are filled; ``shardtune train train.lr=1`` means the default config
    with one override."""
    overrides = [*getattr(args, "overrides", []), *extra]
    if args.config is not None and "=" in args.config:
        return None, [args.config, *overrides]
    return args.config, overrides


def load_run_config(args, extra: list[str], parser: argparse.ArgumentParser):
    from shardtune.config import load_config

    reject_stray(parser, extra)
    config_path, overrides = config_and_overrides(args, extra)
    return config_path, overrides, load_config(config_path, overrides)
