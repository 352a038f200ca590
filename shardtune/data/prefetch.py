"""Background prefetch: worker threads build the next steps while the loop trains on this one.

Threads, not processes: building a step is numpy slicing of memory-mapped shards plus a
``np.stack``, which release the GIL, and the sources hold memory maps that a process would
have to re-open (pickling one copies the whole array). Threads also share the training
process's torch state instead of forking a process that holds a NCCL/gloo communicator.

Determinism does not depend on the threads: jobs are taken in order from one planner under
a lock, and results are handed back strictly in job order, so which worker built a step, and
when, never changes what the loop receives.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any

_END = object()


class _Failure:
    def __init__(self, exc: BaseException, job: Any, worker: str):
        self.exc, self.job, self.worker = exc, job, worker


class _Shared:
    """What the worker threads touch; kept apart so a finalizer can stop them without the owner."""

    def __init__(self, workers: int, depth: int):
        self.lock = threading.Lock()  # the planner and the job counter
        self.ready = threading.Condition()
        self.results: dict[int, Any] = {}
        # One permit per step that may be taken but not yet consumed: the queue's bound.
        self.permits = threading.Semaphore(depth)
        self.stop = threading.Event()
        self.issued = 0
        self.ended = False
        self.threads: list[threading.Thread] = []
        self.workers = workers

    def post(self, index: int, item: Any) -> None:
        with self.ready:
            self.results[index] = item
            self.ready.notify_all()

    def shutdown(self, join_timeout: float = 10.0) -> None:
        self.stop.set()
        for _ in self.threads:
            self.permits.release()  # wake every worker blocked on a permit so it sees ``stop``
        with self.ready:
            self.ready.notify_all()
        current = threading.current_thread()
        for thread in self.threads:
            if thread is not current:
                thread.join(join_timeout)


def _work(shared: _Shared, next_job: Callable[[], Any], build: Callable[[Any], Any]) -> None:
    name = threading.current_thread().name
    while True:
        shared.permits.acquire()
        with shared.lock:
            if shared.stop.is_set() or shared.ended:
                return
            index = shared.issued
            try:
                job = next_job()
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer, re-raised there
                shared.ended = True
                shared.post(index, _Failure(exc, None, name))
                return
            shared.issued += 1
            if job is None:
                shared.ended = True
                shared.post(index, _END)
                return
        try:
            result = build(job)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, re-raised there
            with shared.lock:
                shared.ended = True  # nothing is planned after a failure
            shared.post(index, _Failure(exc, job, name))
            return
        shared.post(index, (job, result))


class OrderedPrefetcher:
    """Runs ``build(job)`` on ``workers`` threads for the jobs ``next_job()`` plans (None = end),
    at most ``depth`` ahead of the consumer, and returns ``(job, result)`` in planning order."""

    def __init__(self, next_job: Callable[[], Any], build: Callable[[Any], Any], *,
                 workers: int, depth: int, name: str = "shardtune-data"):
        if workers < 1 or depth < 1:
            raise ValueError(f"prefetch needs workers >= 1 and depth >= 1 (got {workers}, {depth})")
        self._shared = shared = _Shared(workers, depth)
        self._taken = 0
        self._done = False
        shared.threads = [
            threading.Thread(target=_work, args=(shared, next_job, build), name=f"{name}-{i}", daemon=True)
            for i in range(workers)
        ]
        for thread in shared.threads:
            thread.start()
        # Stop the workers at interpreter exit too, before teardown pulls modules from under them.
        self._finalizer = weakref.finalize(self, shared.shutdown, 2.0)

    def get(self) -> tuple[Any, Any] | None:
        """The next ``(job, result)``, or None once the planner said the jobs ended."""
        if self._done:
            return None
        shared = self._shared
        with shared.ready:
            while self._taken not in shared.results:
                if shared.stop.is_set():
                    raise RuntimeError("the data prefetcher was closed")
                if not any(t.is_alive() for t in shared.threads) and self._taken not in shared.results:
                    raise RuntimeError("every data worker thread exited without producing the next step")
                shared.ready.wait(timeout=1.0)
            item = shared.results.pop(self._taken)
        self._taken += 1
        if item is _END:
            self._done = True
            self.close()
            return None
        if isinstance(item, _Failure):
            self._done = True
            self.close()
            exc = item.exc
            where = f"while building {item.job}" if item.job is not None else "while planning the next step"
            # The original exception, so callers still catch it by type (a ShardError stays one);
            # its traceback keeps the worker's frames and the note says where it came from.
            exc.add_note(f"raised in data worker thread {item.worker} {where}")
            raise exc
        shared.permits.release()
        return item

    def close(self) -> None:
        self._finalizer()

    @property
    def alive_workers(self) -> int:
        return sum(t.is_alive() for t in self._shared.threads)
