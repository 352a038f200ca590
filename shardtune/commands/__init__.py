"""One module per CLI verb: each has ``add_parser(sub)`` and ``run(args, extra, parser) -> int``.

Commands raise ``shardtune.errors.ShardtuneError`` subclasses; ``cli.main`` turns them into one line
and the exit code from ``errors.EXIT_CODES``.
"""

VERBS = ("train", "launch", "slurm", "plan", "ckpt", "sweep", "eval", "report", "config", "data", "model", "compare", "generate")
