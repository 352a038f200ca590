"""Only rank 0 prints library chatter; every other rank writes it to its own log file.

With N ranks a user otherwise reads each transformers FutureWarning and each model "LOAD
REPORT" N times, interleaved. What is silenced on the other ranks: Python warnings (via
``logging.captureWarnings``) and the loggers of the libraries we call (transformers, torch,
DeepSpeed, PEFT). Their own prints and shardtune's errors are left alone: an exception on
rank 3 must still reach the terminal.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

LIBRARY_LOGGERS = ("py.warnings", "transformers", "torch", "DeepSpeed", "deepspeed", "peft", "accelerate")


def rank_log_path(log_dir: Path, rank: int) -> Path:
    return Path(log_dir) / f"rank{rank}.log"


def quiet_other_ranks(rank: int, log_dir: Path | None) -> Path | None:
    """On ranks other than 0, send warnings and library logs to ``log_dir/rank<N>.log``.

    Returns that file (None on rank 0, or with no ``log_dir``: then they are discarded).
    Safe to call more than once: the handlers are replaced, not added to.
    """
    if rank == 0:
        return None
    path = None
    if log_dir is not None:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        path = rank_log_path(log_dir, rank)
        handler: logging.Handler = logging.FileHandler(path, delay=True)
        handler.setFormatter(logging.Formatter(f"%(asctime)s rank {rank} %(name)s %(levelname)s: %(message)s"))
    else:
        handler = logging.NullHandler()
    logging.captureWarnings(True)
    # "default" shows each warning once per location, as Python does; PYTHONWARNINGS or -W
    # filters set earlier keep priority because this only appends a filter.
    warnings.simplefilter("default", append=True)
    try:  # transformers keeps its own stderr handler on its root logger
        from transformers.utils import logging as hf_logging

        hf_logging.disable_default_handler()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        for old in list(logger.handlers):
            logger.removeHandler(old)
        logger.addHandler(handler)
        logger.propagate = False
    return path
