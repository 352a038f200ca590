"""``shardtune train``: this process's share of a job, under torchrun or alone."""

from __future__ import annotations

from shardtune.commands._args import add_config_args, load_run_config


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="run this process's share of a job (under torchrun, or alone)")
    add_config_args(p)


def run(args, extra, parser) -> int:
    from shardtune.train.loop import train

    _, _, cfg = load_run_config(args, extra, parser)
    train(cfg)
    return 0
