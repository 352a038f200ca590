"""``shardtune report RUN_DIR``: (re)write report.md and its plots."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="(re)write report.md and its plots for a run directory")
    p.add_argument("run_dir")


def run(args, extra, parser) -> int:
    from shardtune.commands._args import reject_stray
    from shardtune.eval.report import write_report

    reject_stray(parser, extra)
    print(write_report(args.run_dir, plots=True))
    return 0
