"""``shardtune train``: this process's share of a job, under torchrun or alone."""

from __future__ import annotations

from shardtune.commands._args import add_config_args, load_run_config


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="run this process's share of a job (under torchrun, or alone)")
    add_config_args(p)


def run(args, extra, parser) -> int:
    _, _, cfg = load_run_config(args, extra, parser)
    from shardtune.launch.trainer_signals import LAUNCHER_PID_ENV, die_with_launcher

    die_with_launcher()  # under a launcher: never outlive it (no orphan writing checkpoints)
    from shardtune.distributed.environment import detect_environment
    from shardtune.distributed.quiet import quiet_other_ranks

    # Before the imports that warn: only rank 0 prints library warnings and load reports.
    quiet_other_ranks(detect_environment().rank, cfg.output_dir / "logs")
    import contextlib
    import os

    from shardtune.run_dirs import hold_run_dir
    from shardtune.train.loop import train

    # `shardtune launch` holds the run directory's lock for its trainers; started any other way
    # (alone, plain torchrun, srun), rank 0 does.
    own_lock = LAUNCHER_PID_ENV not in os.environ and detect_environment().rank == 0
    with hold_run_dir(cfg.output_dir) if own_lock else contextlib.nullcontext():
        train(cfg)
    return 0
