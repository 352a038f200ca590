"""Trainers forked from a launcher that has already imported what every trainer imports.

A rank started by ``python -m shardtune train`` spends most of a short job importing torch's
distributed packages, transformers' model code and shardtune's trainer: ~4 s of CPU per rank on
this project's 2-core CI machine, paid again by every rank of every node, and read from the
(often shared, networked) file system each time. ``shardtune launch`` imports them once, then
torchrun forks its workers (``--start-method=fork``), which find them already loaded.

Forking is safe only before the launcher touches CUDA (a forked child cannot use a CUDA context)
or runs an OpenMP parallel region (GNU libgomp's thread team does not survive a fork; the
launcher computes nothing). ``preload`` checks the first and ``shardtune launch`` falls
back to starting each worker with exec when it fails. The OpenBLAS pools that numpy and scipy
start at import are fork-safe (they re-create their threads in the child).

A forked worker's command line is its launcher's, so it names itself ``shardtune-train`` (its
``/proc/<pid>/comm``); ``trainer_signals`` finds trainers by either.
"""

from __future__ import annotations

import atexit
import importlib
import signal
import sys
from pathlib import Path

# What torchrun runs in each forked worker, by path (runpy, as __main__).
FORKED_TRAINER_SCRIPT = str(Path(__file__).with_name("forked_trainer.py"))
TRAINER_PROCESS_NAME = "shardtune-train"  # at most 15 bytes: the kernel's comm field
_PR_SET_NAME = 15


def preload(modules: list[str]) -> bool:
    """Import ``modules`` here, before torchrun forks; True if forking is still safe.

    A module that cannot be imported is skipped: the worker imports it, and reports why."""
    import torch

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    return not torch.cuda.is_initialized()


def report_worker_exits_in_one_line() -> None:
    """torchrun logs a forked worker's non-zero exit (75 after a requested stop included) with
    the traceback of its own bookkeeping exception, where an exec'd worker's exit is one line;
    the line is kept and the traceback, which says nothing about the worker, dropped."""
    import logging

    def strip_traceback(record: logging.LogRecord) -> bool:
        record.exc_info = record.exc_text = None
        return True

    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(strip_traceback)


def run_trainer(argv: list[str]) -> None:
    """The forked worker: ``shardtune train ARGV`` in a process that starts as a launcher copy.

    torchrun's function entrypoints must return to report success (the return value travels to
    the agent); a failure exits at once with the trainer's exit code, as an exec'd trainer would.
    An exception nobody caught is printed here, as the interpreter of an exec'd trainer prints
    it: torchrun would only write it to an error file that nobody reads.
    """
    import os

    _forget_launcher()
    from shardtune import cli

    sys.argv = [cli.__file__, "train", *argv]  # what an exec'd trainer's sys.argv holds
    try:
        code = cli.main(["train", *argv])
    except KeyboardInterrupt:  # an exec'd interpreter re-raises SIGINT to die of it
        cli.release_process()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        raise
    except BaseException:
        import traceback

        traceback.print_exc()
        cli.release_process()
        os._exit(1)
    cli.release_process()
    if code:
        os._exit(code)


def _forget_launcher() -> None:
    """Drop what the worker inherited from the launcher but must not act on: its signal handlers
    (a stop signal would be forwarded to this worker's non-existent workers instead of stopping
    it), its exit hooks, and its block-buffered output (an exec'd worker runs ``python -u``)."""
    for signum in signal.valid_signals():
        handler = signal.getsignal(signum)
        if callable(handler) and handler is not signal.default_int_handler:
            signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    atexit._clear()
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(line_buffering=True)
    _name_process(TRAINER_PROCESS_NAME)  # last: found as a trainer once it has its own handlers


def _name_process(name: str) -> None:
    try:
        import ctypes

        ctypes.CDLL(None).prctl(_PR_SET_NAME, name.encode(), 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: trainers are found by command line only
        pass
