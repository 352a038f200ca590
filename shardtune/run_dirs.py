"""Safe permissions for what shardtune writes: nothing group- or world-writable.

Whoever can write into a run directory can replace a checkpoint that the next ``resume:
auto`` loads, or a prepared shard the next run trains on. So the directories shardtune
creates are ``0o750`` (narrowed further by a stricter umask), and the command line strips
group and world write from the process umask, which covers every file and directory the
trainers, torchrun workers, TensorBoard and DCP create below them. Existing directories
are left as the user made them.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import sys
import time
from pathlib import Path

from shardtune.errors import RunDirInUseError

RUN_DIR_MODE = 0o750
NO_SHARED_WRITE = 0o022  # umask bits: group write, other write


def restrict_umask() -> int:
    """Add group/world write to the umask bits (the rest of the user's umask stands)."""
    current = os.umask(0)
    os.umask(current | NO_SHARED_WRITE)
    return current


def make_run_dir(path: str | Path) -> Path:
    """``mkdir -p`` where every directory created gets ``RUN_DIR_MODE`` (``mkdir -p`` would
    give the parents the default mode). Safe when several ranks create it at once."""
    path = Path(path)
    missing = []
    probe = path
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=RUN_DIR_MODE)
        except FileExistsError:
            pass  # another rank was first
    if not path.is_dir():
        raise NotADirectoryError(f"{path} exists and is not a directory")
    return path


LOCK_FILE = ".shardtune.lock"


@contextlib.contextmanager
def hold_run_dir(path: str | Path, *, what: str = "job"):
    """Hold an exclusive ``flock`` on ``path/.shardtune.lock`` for the duration of a job.

    Two jobs in one run directory would both write ``step-*`` and ``latest`` (an immediate
    relaunch after a lost launcher, a sweep task started twice). The kernel drops the lock
    when the holder dies, however it dies, so a stale lock cannot outlive its job; the file
    only says who holds it, for the message the second job gets.
    """
    directory = make_run_dir(path)
    lock = directory / LOCK_FILE
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o640)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
            raise RunDirInUseError(
                f"{directory} is in use by {holder}; a second {what} there would write the same "
                "checkpoints. Wait for it to end (or stop it), or choose another run.output_dir"
            ) from None
        me = f"pid {os.getpid()} on {socket.gethostname()} (started {time.strftime('%Y-%m-%d %H:%M:%S')}: " \
             f"{' '.join(sys.argv[:3])} ...)"
        os.ftruncate(fd, 0)
        os.pwrite(fd, me.encode() + b"\n", 0)
        yield lock
    finally:
        os.close(fd)  # releases the lock
