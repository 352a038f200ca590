"""Every user-facing failure, and the one table that turns it into an exit code.

Commands raise; ``cli.main`` prints one line and exits with the code from ``EXIT_CODES``. A wrapper
script (a SLURM requeue hook, a sweep driver) can then tell a bad config from a preemption from a
crash without parsing messages.
"""

from __future__ import annotations

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later", which is what a requeue does
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, what a shell reports for Ctrl-C: stopped at once, no new checkpoint


class ShardtuneError(Exception):
    """Base of the errors a user can act on; the message names the file, line or key."""


class ConfigError(ShardtuneError, ValueError):
    """A user-facing configuration problem; the message names the file and key path."""


class DataError(ShardtuneError, ValueError):
    """A bad input record or data file; the message names the file and line."""


class ShardError(ShardtuneError, ValueError):
    """A prepared directory that is missing, corrupted, or made with another tokenizer."""


class CheckpointError(ShardtuneError, RuntimeError):
    """A missing, corrupt or incompatible checkpoint; the message names the file or tensor."""


class UnsafeCheckpointError(ShardtuneError, RuntimeError):
    """A checkpoint file that would run code or hold something other than tensors and JSON."""


class NonFiniteLossError(ShardtuneError, RuntimeError):
    """The agreed loss or gradient norm was NaN/Inf on some rank; the run stopped without saving it."""


class CollectiveTimeoutError(ShardtuneError, RuntimeError):
    """A collective did not finish in time; the message names the ranks that had not arrived."""


class SubmitError(ShardtuneError, RuntimeError):
    """A SLURM submission that sbatch refused or that could not be rendered."""


class MissingExtraError(ShardtuneError, ImportError):
    """The config asks for an optional package (an extra such as shardtune[wandb]) that is not installed."""


class ModelImportError(ShardtuneError, ValueError):
    """A model file that cannot be imported (a missing, truncated or corrupt GGUF); the message names it."""


class RendezvousError(ShardtuneError, RuntimeError):
    """Ranks could not meet: the message names each rank and host that cannot reach rank 0's address."""


class RunDirInUseError(ShardtuneError, RuntimeError):
    """Another job holds the run directory's lock; the message names its pid, host and command."""


class Interrupted(ShardtuneError, RuntimeError):
    """Stopped at once by a second interrupt: no new checkpoint, the last committed one stands."""


class Preempted(ShardtuneError, RuntimeError):
    """Raised after the checkpoint is committed, so the process exits with PREEMPTED_EXIT_CODE."""


# (error class, exit code, what the one printed line starts with, what it ends with).
# 1 stays Python's own "crashed with a traceback"; 2 is argparse's "bad usage".
EXIT_CODES: list[tuple[type[ShardtuneError], int, str, str]] = [
    (ConfigError, 2, "", ""),
    (SubmitError, 2, "", ""),
    (DataError, 2, "data error: ", ""),
    (ShardError, 2, "data error: ", ""),
    (NonFiniteLossError, 3, "stopped: ", ""),
    (CheckpointError, 4, "checkpoint error: ", ""),
    (UnsafeCheckpointError, 4, "checkpoint error: ", ""),
    (CollectiveTimeoutError, 5, "", ""),
    (MissingExtraError, 2, "", ""),
    (ModelImportError, 2, "model error: ", ""),
    (RendezvousError, 5, "rendezvous failed: ", ""),
    (RunDirInUseError, 6, "", ""),
    (Interrupted, INTERRUPTED_EXIT_CODE, "interrupted: ", ""),
    (Preempted, PREEMPTED_EXIT_CODE, "", "; rerun the same command to resume"),
]


def exit_code_for(exc: ShardtuneError) -> tuple[int, str]:
    """The exit code and the one line to print for a failure the user can act on."""
    for cls, code, prefix, suffix in EXIT_CODES:
        if isinstance(exc, cls):
            return code, f"shardtune: {prefix}{exc}{suffix}"
    return 1, f"shardtune: {exc}"
