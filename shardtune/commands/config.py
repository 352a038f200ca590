"""``shardtune config show``: the resolved config, as a run would see it."""

from __future__ import annotations

from shardtune.commands._args import add_config_args, load_run_config


def add_parser(sub) -> None:
    p = sub.add_parser("config", help="inspect configs")
    config_sub = p.add_subparsers(dest="config_command", required=True)
    p_show = config_sub.add_parser("show", help="print the resolved config")
    add_config_args(p_show)
    p_show.add_argument("--explain", metavar="KEY", help="print a key's type, default and documentation instead")


def run(args, extra, parser) -> int:
    from shardtune.config import dump_config, explain_key

    if args.explain:
        print(explain_key(args.explain))
        return 0
    _, _, cfg = load_run_config(args, extra, parser)
    print(dump_config(cfg), end="")
    return 0
