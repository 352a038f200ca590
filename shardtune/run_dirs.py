"""Safe permissions for what shardtune writes: nothing group- or world-writable.

Whoever can write into a run directory can replace a checkpoint that the next ``resume:
auto`` loads, or a prepared shard the next run trains on. So the directories shardtune
creates are ``0o750`` (narrowed further by a stricter umask), and the command line strips
group and world write from the process umask, which covers every file and directory the
trainers, torchrun workers, TensorBoard and DCP create below them. Existing directories
are left as the user made them.
"""

from __future__ import annotations

import os
from pathlib import Path

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
