"""Command line: ``shardtune train|launch|sweep|eval|report|slurm|plan|config|data|ckpt``.

Each verb is one module in ``shardtune/commands/``. A failure the user can act on is one line on
stderr and an exit code from the table in ``shardtune/errors.py``; anything else keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from shardtune.commands import VERBS
from shardtune.errors import ShardtuneError, exit_code_for
from shardtune.run_dirs import restrict_umask


def _verb(name: str):
    return importlib.import_module(f"shardtune.commands.{name}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardtune", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in VERBS:
        _verb(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come after options (``launch cfg --nproc 2 train.lr=1``): argparse leaves them in
    # ``extra`` once the positionals are filled, and each verb decides what it accepts there.
    args, extra = parser.parse_known_args(argv)
    # Before anything is written (and inherited by torchrun's workers): no group/world write.
    restrict_umask()
    try:
        return _verb(args.command).run(args, extra, parser)
    except ShardtuneError as exc:
        code, line = exit_code_for(exc)
        print(line, file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
