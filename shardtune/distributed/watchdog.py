"""Name the rank that stalled when a collective times out.

Nothing is sent per step: each rank only remembers, in memory, the last step at which it
reached the per-step synchronisation (``mark_progress``). When a collective fails, each
survivor publishes that step in the rendezvous store once, waits briefly for the others'
reports, and names the ranks that did not report or are behind, instead of gloo's "Timed
out waiting 60000ms for recv operation". A rank dying of any other exception reports that
(``report_crash``): the survivors name it and its exception without waiting for it. At 1,000
ranks a per-step write would have been 1,000 store requests per step to rank 0's store; now
the store sees traffic only on failure.

The wait for the others' reports also ends when the caller says the process was asked to stop
(``interrupted``): a launcher that saw a rank die SIGTERMs the survivors, and every second
spent waiting for a report that cannot come delays its restart (10 s per lost rank, measured).

Why a silent rank's last synchronised step is known without its report: survivors at step
``s`` passed the all-reduce of step ``s - 1``, which needed every rank, so every rank reached
step ``s - 1``'s synchronisation.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from datetime import timedelta

from shardtune.errors import CollectiveTimeoutError

# The restart count keeps a report from an earlier attempt (torchelastic keeps its store
# across restarts) from passing for a live rank of this one.
_KEY = "shardtune/stall/{restart}/{rank}"
_FAILURE = re.compile(r"timed out|timeout|connection closed by peer|connection reset|broken pipe", re.I)
_last_step: int | None = None


def _store():
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store()
    except (RuntimeError, ValueError, ImportError):
        return None


def _key(rank: int) -> str:
    return _KEY.format(restart=os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"), rank=rank)


def mark_progress(rank: int, step: int) -> None:
    """This rank reached ``step``'s synchronisation: kept in memory, sent only on failure."""
    global _last_step
    _last_step = step


def last_marked_step() -> int | None:
    return _last_step


def report_crash(rank: int, error: BaseException) -> None:
    """This rank is dying of ``error``, which is not a collective's: say so in the store, so the
    survivors need not wait out their grace for a report that would never come, and can name
    it. Best effort and bounded: a store that cannot take it within 2 s is left alone."""
    store = _store()
    if store is None:
        return
    store.set_timeout(timedelta(seconds=2))
    step = _last_step if _last_step is not None else -1
    try:
        store.set(_key(rank), f"{step} {type(error).__name__}")
    except (RuntimeError, ValueError):
        pass


def report_and_read_progress(
    rank: int, world_size: int, grace_s: float, interrupted: Callable[[], bool] | None = None,
) -> dict[int, tuple[int | None, str | None]]:
    """Publish this rank's step, wait up to ``grace_s`` for every rank's (less if ``interrupted()``
    turns true), return what arrived: (last synchronised step or None, the exception it died of
    where it reported a crash). Empty when the store cannot be reached at all."""
    store = _store()
    if store is None:
        return {}
    store.set_timeout(timedelta(seconds=10))
    try:
        store.set(_key(rank), str(_last_step if _last_step is not None else -1))
    except (RuntimeError, ValueError):
        return {}  # the store lives with rank 0: unreachable means rank 0 is gone
    keys = [_key(r) for r in range(world_size)]
    deadline = time.monotonic() + grace_s
    while True:
        try:
            present = [store.check([k]) for k in keys]
        except (RuntimeError, ValueError):
            return {}
        if all(present) or time.monotonic() >= deadline or (interrupted is not None and interrupted()):
            break
        time.sleep(0.2)
    progress: dict[int, tuple[int | None, str | None]] = {}
    for r, (key, there) in enumerate(zip(keys, present, strict=True)):
        try:
            step, _, crash = store.get(key).decode().partition(" ") if there else ("", "", "")
            value = int(step) if step else None
        except (RuntimeError, ValueError):
            value, crash = None, ""
        progress[r] = (None if value is None or value < 0 else value, crash or None)
    return progress


def explain_collective_failure(
    error: BaseException, rank: int, world_size: int, timeout_s: float,
    interrupted: Callable[[], bool] | None = None,
) -> CollectiveTimeoutError | None:
    """A clearer error if ``error`` is a timed-out collective or a lost peer, else None."""
    if not _FAILURE.search(str(error)):
        return None
    # Survivors time out within moments of each other (they entered the collective together).
    progress = report_and_read_progress(rank, world_size, grace_s=min(10.0, max(2.0, timeout_s / 4)),
                                        interrupted=interrupted)
    steps = {r: step for r, (step, _) in progress.items()}
    crashes = {r: crash for r, (_, crash) in progress.items() if crash}
    reached = [s for s in steps.values() if s is not None]
    furthest = max(reached) if reached else None
    behind = sorted(r for r, s in steps.items() if r != rank and (s is None or s != furthest or r in crashes))
    if not reached:
        suspects = "the rendezvous store is unreachable: rank 0 or its host is likely gone"
    elif behind:
        suspects = ", ".join(_describe(r, steps[r], furthest, crashes.get(r)) for r in behind)
    else:
        suspects = "unknown: every other rank reached the same step (one may have died inside it)"
    first_line = (str(error).strip().splitlines() or [""])[0][:300]
    return CollectiveTimeoutError(
        f"rank {rank}: a collective failed or did not complete within {timeout_s:.0f} s "
        f"(distributed.collective_timeout_s); suspect: {suspects}. Underlying error: {first_line}"
    )


def _describe(rank: int, step: int | None, furthest: int, crash: str | None = None) -> str:
    if crash is not None:
        return f"rank {rank} died of {crash}" + ("" if step is None else f" after synchronising step {step}")
    if step is not None:
        return f"rank {rank} (last synchronised at step {step}, others at {furthest})"
    # Silent: stalled or dead. It passed step furthest-1's all-reduce, as the survivors did.
    last = furthest - 1 if furthest > 1 else "none"
    return f"rank {rank} (last synchronised at step {last}, others at {furthest}) sent no report: stalled or dead"
