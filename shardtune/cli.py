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
        _keep_until_exit(exc)
        return code


_last_failure: BaseException | None = None


def _keep_until_exit(exc: BaseException) -> None:
    """Keep a failed command's traceback, and so every object its frames hold, alive.

    A failed run's model, its DDP reducer and the gloo process group are reachable only from
    the traceback. Freed when the ``except`` block ends, the group's destructor runs with the
    GIL held and can deadlock with gloo's worker thread, which needs the GIL to free the
    tensors of a collective it just finished (seen once: a 1-rank run refusing a corrupt
    resume hung at exit, stuck in ``~ProcessGroupGloo``). ``entry`` exits without teardown
    right after, so nothing is freed at all; in-process callers hold one failure at most.
    """
    global _last_failure
    _last_failure = exc


def entry() -> None:
    """The ``shardtune`` executable (and ``python -m shardtune``): ``main``, then an exit that
    skips the interpreter's teardown once the command has returned.

    Freeing torch's and transformers' thousands of modules and C++ objects costs 1-1.5 s per
    process after the work is done (measured on a tiny run: 1.47 s of 10.6 s), paid by every
    rank and the launcher, and gloo's destructors sometimes abort in it ("terminate called
    without an active exception"). What a clean exit owes is still done: non-daemon threads
    are stopped and joined, atexit handlers run (trackers, logging, multiprocessing children) and the
    standard streams are flushed. An uncaught exception is printed as the interpreter prints it
    and exits 1, also without teardown: its traceback holds the failed run's objects, whose
    freeing can deadlock in gloo (``_keep_until_exit``). Ctrl-C and ``SystemExit`` (argparse's
    usage errors) take the interpreter's ordinary path.
    """
    import os

    try:
        code = main()
    except Exception:
        import traceback

        traceback.print_exc()
        release_process()
        os._exit(1)
    release_process()
    os._exit(code if isinstance(code, int) else 0)


def release_process() -> None:
    """What a clean interpreter exit does that still matters once a command has returned."""
    import atexit
    import threading

    # What the interpreter's own shutdown runs first: the threading-atexit hooks (they tell idle
    # ThreadPoolExecutor workers, such as the checkpoint writer after a failed save, to exit),
    # then a join of every non-daemon thread. Joining without the hooks waits forever.
    threading._shutdown()
    atexit._run_exitfuncs()
    _finalize_mpi()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can reach it anyway
            pass


def _finalize_mpi() -> None:
    """mpi4py finalizes MPI from a C-level exit hook (``Py_AtExit``), which ``os._exit`` skips;
    mpirun reports a rank that exits without it as a failure of the whole job."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()


if __name__ == "__main__":
    entry()
