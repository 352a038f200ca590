"""Fault injection for the fault-tolerance tests, driven by environment variables.

Production runs never set these; each hook is one dictionary lookup per step.
``step:rank`` lists are comma-separated.

* ``SHARDTUNE_FAULT_NONFINITE=3:1``  rank 1's loss at step 3 becomes NaN (and its gradients)
* ``SHARDTUNE_FAULT_KILL=5:0``       rank 0 SIGKILLs itself at step 5, on the first attempt only
* ``SHARDTUNE_FAULT_STALL=4:1:600``  rank 1 sleeps 600 s at step 4, just before the step's sync
"""

from __future__ import annotations

import os
import signal
import time


def _matches(var: str, step: int, rank: int) -> list[str] | None:
    spec = os.environ.get(var)
    if not spec:
        return None
    for item in spec.split(","):
        parts = item.split(":")
        if parts[:2] == [str(step), str(rank)]:
            return parts[2:]
    return None


def nonfinite_loss(step: int, rank: int) -> bool:
    return _matches("SHARDTUNE_FAULT_NONFINITE", step, rank) is not None


def maybe_kill(step: int, rank: int) -> None:
    # Only on torchrun's first attempt: the restarted group must get past the step.
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    if _matches("SHARDTUNE_FAULT_KILL", step, rank) is not None:
        os.kill(os.getpid(), signal.SIGKILL)


def maybe_stall(step: int, rank: int) -> None:
    extra = _matches("SHARDTUNE_FAULT_STALL", step, rank)
    if extra is not None:
        time.sleep(float(extra[0]) if extra else 3600.0)
