"""The stall detector sends nothing per step and still names the stalled rank on failure.
(The end-to-end case, a real stalled rank at 2 ranks, is tests/faults/test_stall_and_kill.py.)"""

from __future__ import annotations

import torch.distributed as dist

from shardtune.distributed import watchdog

TIMEOUT = RuntimeError("[gloo] Timed out waiting 10000ms for recv operation to complete")


def test_marks_cost_no_store_request_per_step(monkeypatch):
    store = dist.HashStore()
    monkeypatch.setattr(watchdog, "_store", lambda: store)
    for step in range(1, 1001):
        watchdog.mark_progress(0, step)
    assert store.num_keys() == 0
    assert watchdog.last_marked_step() == 1000


def test_a_silent_rank_is_named_with_its_last_synchronised_step(monkeypatch):
    store = dist.HashStore()
    monkeypatch.setattr(watchdog, "_store", lambda: store)
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    store.set(watchdog._key(2), "7")  # rank 2 timed out in step 7 too and reported; rank 1 is silent
    watchdog.mark_progress(0, 7)
    error = watchdog.explain_collective_failure(TIMEOUT, rank=0, world_size=3, timeout_s=4)
    assert error is not None
    assert "suspect: rank 1 (last synchronised at step 6, others at 7) sent no report" in str(error)
    assert "rank 2" not in str(error).split("Underlying")[0]
    assert "within 4 s" in str(error)


def test_a_rank_behind_is_named_with_its_own_step(monkeypatch):
    store = dist.HashStore()
    monkeypatch.setattr(watchdog, "_store", lambda: store)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    store.set("shardtune/stall/0/1", "9")  # a report from the attempt before the restart: ignored
    store.set(watchdog._key(1), "4")
    watchdog.mark_progress(0, 5)
    error = watchdog.explain_collective_failure(TIMEOUT, rank=0, world_size=2, timeout_s=4)
    assert "suspect: rank 1 (last synchronised at step 4, others at 5)" in str(error)


def test_other_errors_are_left_alone():
    assert watchdog.explain_collective_failure(ValueError("bad shape"), 0, 2, 60) is None


def test_a_crashed_rank_is_named_with_its_exception_without_waiting(monkeypatch):
    import time

    store = dist.HashStore()
    monkeypatch.setattr(watchdog, "_store", lambda: store)
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    watchdog.mark_progress(1, 3)
    watchdog.report_crash(1, ValueError("bad batch"))  # rank 1, dying in step 4's work
    watchdog.mark_progress(0, 4)
    start = time.monotonic()
    error = watchdog.explain_collective_failure(
        RuntimeError("Connection closed by peer [127.0.0.1]:1234"), rank=0, world_size=2, timeout_s=60)
    assert time.monotonic() - start < 2  # every report is there: no grace to wait out (10 s here)
    assert "suspect: rank 1 died of ValueError after synchronising step 3" in str(error)


def test_a_stop_signal_ends_the_wait_for_reports_that_cannot_come(monkeypatch):
    """torchrun SIGTERMs the survivors of a lost rank: they name it at once, not after the grace."""
    import os
    import signal
    import time

    from shardtune.train import signals

    store = dist.HashStore()
    monkeypatch.setattr(watchdog, "_store", lambda: store)
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    monkeypatch.setattr(signals, "_received", None)
    watchdog.mark_progress(0, 5)
    stop = signals.StopRequest(enabled=True)
    try:
        os.kill(os.getpid(), signal.SIGTERM)  # the launcher's teardown; rank 1 was SIGKILLed: silent
        start = time.monotonic()
        error = watchdog.explain_collective_failure(
            RuntimeError("Connection closed by peer [127.0.0.1]:1234"), rank=0, world_size=2, timeout_s=60,
            interrupted=signals.stop_received)
        waited = time.monotonic() - start
    finally:
        stop.restore()
    assert waited < 2, waited  # the grace at timeout 60 s is 10 s
    assert "suspect: rank 1 (last synchronised at step 4, others at 5) sent no report" in str(error)
    # Without a signal the same failure waits its grace for rank 1's report.
    monkeypatch.setattr(signals, "_received", None)
    start = time.monotonic()
    watchdog.explain_collective_failure(TIMEOUT, rank=0, world_size=2, timeout_s=8, interrupted=signals.stop_received)
    assert time.monotonic() - start >= 2  # grace: timeout / 4 = 2 s
