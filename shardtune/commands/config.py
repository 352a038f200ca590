"""``shardtune config show``: the resolved config, as a run would see it."""

from __future__ import annotations

from shardtune.commands._args import add_config_args, load_run_config


def add_parser(sub) -> None:
    p = sub.add_parser("config", help="inspect configs")
    config_sub = p.add_subparsers(dest="config_command", required=True)
    p_show = config_sub.add_parser("show", help="print the resolved config")
    add_config_args(p_show)


def run(args, extra, parser) -> int:
    from shardtune.config import dump_config

    _, _, cfg = load_run_config(args, extra, parser)
    print(dump_config(cfg), end="")
    return 0
