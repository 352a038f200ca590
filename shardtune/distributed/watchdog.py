"""Name the rank that stalled when a collective times out.

Each rank records, in the rendezvous store, the last step at which it reached the per-step
synchronisation (one small write per rank per step; nothing is gathered, nothing is read).
When a collective times out, the survivors read everyone's progress once and report the
ranks that are behind, instead of gloo's "Timed out waiting 60000ms for recv operation".
"""

from __future__ import annotations

import re
from datetime import timedelta

from shardtune.errors import CollectiveTimeoutError

_KEY = "shardtune/progress/{rank}"
_FAILURE = re.compile(r"timed out|timeout|connection closed by peer|connection reset|broken pipe", re.I)


def _store():
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store()
    except (RuntimeError, ValueError, ImportError):
        return None


def mark_progress(rank: int, step: int) -> None:
    store = _store()
    if store is not None:
        store.set(_KEY.format(rank=rank), str(step))


def read_progress(world_size: int) -> dict[int, int | None]:
    store = _store()
    if store is None:
        return {}
    store.set_timeout(timedelta(seconds=10))
    progress: dict[int, int | None] = {}
    for rank in range(world_size):
        key = _KEY.format(rank=rank)
        try:
            progress[rank] = int(store.get(key)) if store.check([key]) else None
        except (RuntimeError, ValueError):
            progress[rank] = None
    return progress


def explain_collective_failure(
    error: BaseException, rank: int, world_size: int, timeout_s: float
) -> CollectiveTimeoutError | None:
    """A clearer error if ``error`` is a timed-out collective or a lost peer, else None."""
    if not _FAILURE.search(str(error)):
        return None
    progress = read_progress(world_size)
    reached = [s for s in progress.values() if s is not None]
    furthest = max(reached) if reached else None
    behind = sorted(r for r, s in progress.items() if r != rank and (s is None or s != furthest))
    if reached == [] and progress:
        suspects = "the rendezvous store is unreachable: rank 0 or its host is likely gone"
    elif behind:
        suspects = ", ".join(
            f"rank {r} (last synchronised at step {progress[r] if progress[r] is not None else 'none'}, "
            f"others at {furthest})" for r in behind
        )
    else:
        suspects = "unknown: every other rank reached the same step (one may have died inside it)"
    first_line = (str(error).strip().splitlines() or [""])[0][:300]
    return CollectiveTimeoutError(
        f"rank {rank}: a collective failed or did not complete within {timeout_s:.0f} s "
        f"(distributed.collective_timeout_s); suspect: {suspects}. Underlying error: {first_line}"
    )
