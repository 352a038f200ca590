"""``shardtune plan``: per-rank memory of every strategy, and a recommendation."""

from __future__ import annotations

from shardtune.commands._args import add_config_args, load_run_config
from shardtune.errors import ConfigError


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="estimate per-rank memory for every strategy and recommend one")
    add_config_args(p)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu-memory", default="80GiB", help="memory per GPU, e.g. 80GiB")


def run(args, extra, parser) -> int:
    from shardtune.plan import run_plan

    _, _, cfg = load_run_config(args, extra, parser)
    try:
        print(run_plan(cfg, args.nodes, args.gpus_per_node, args.gpu_memory))
    except ValueError as exc:  # a --gpu-memory that does not parse, a model config that cannot be read
        raise ConfigError(str(exc)) from None
    return 0
