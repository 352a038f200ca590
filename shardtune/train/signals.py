"""Save-on-request: SIGUSR1 / SIGTERM / SIGINT / SIGHUP set a flag; the loop agrees on it across ranks.

Handlers never do work themselves: a rank cannot checkpoint alone, so the flag travels in
the next per-step all-reduce and every rank saves at the same step boundary. A second SIGINT
(Ctrl-C twice) is the way to stop at once: the first one puts SIGINT back to its default
action, so the second kills the process wherever it is (exit 130 through the launcher). That
never leaves a half-committed checkpoint: a save becomes a checkpoint only by a rename, and
an interrupted one stays a ``.tmp-*`` directory that the next start removes.
"""

from __future__ import annotations

import signal

# Each asks for a checkpoint at the next step boundary and exit 75 (docs/reliability.md).
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


_received: str | None = None  # the first stop signal this process got, whichever StopRequest took it


def stop_received() -> bool:
    """Whether a stop signal reached this process (also after its StopRequest is gone)."""
    return _received is not None


class StopRequest:
    def __init__(self, enabled: bool):
        self.signal_name: str | None = None
        self._previous = {}
        if enabled:
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        global _received
        self.signal_name = signal.Signals(signum).name
        _received = _received or self.signal_name
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)  # a second Ctrl-C aborts at once

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def ignore_further(self) -> None:
        """Once the preemption checkpoint is committed the process only has to exit 75.

        torchrun treats a rank's exit 75 as a failure and SIGTERMs the ranks still tearing
        down; one killed there would report -15 and turn the launcher's 75 into a plain
        failure (measured: 1 run in 2 under load). Ignored, they finish and exit 75 too.
        """
        for sig in STOP_SIGNALS:
            if sig != signal.SIGINT:  # a second Ctrl-C still aborts
                signal.signal(sig, signal.SIG_IGN)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
