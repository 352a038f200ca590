"""``shardtune train``: this process's share of a job, under torchrun or alone."""

from __future__ import annotations

from shardtune.commands._args import add_config_args, load_run_config


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="run this process's share of a job (under torchrun, or alone)")
    add_config_args(p)


def run(args, extra, parser) -> int:
    _, _, cfg = load_run_config(args, extra, parser)
    from shardtune.distributed.environment import detect_environment
    from shardtune.distributed.quiet import quiet_other_ranks

    # Before the imports that warn: only rank 0 prints library warnings and load reports.
    quiet_other_ranks(detect_environment().rank, cfg.output_dir / "logs")
    from shardtune.train.loop import train

    train(cfg)
    return 0
