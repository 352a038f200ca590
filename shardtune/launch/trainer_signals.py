"""Deliver a stop signal to the trainer processes on this node, and to nothing else.

Signalling a whole SLURM step kills the torchrun agent (SIGUSR1's default action) and any
helper process without a handler; ``pkill -f`` would also hit other jobs' trainers on a shared
node. So a process is signalled only if it is a ``shardtune train`` process (not its launcher,
not a forked child of a trainer), belongs to the given job, and has already installed a handler
for the signal; one that is still starting up is waited for.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from shardtune.launch.forked import TRAINER_PROCESS_NAME

PROC = Path("/proc")


@dataclass(frozen=True)
class Trainer:
    pid: int
    catches: bool


def is_trainer_command(argv: list[str]) -> bool:
    """``python [opts] -m shardtune train ...`` or the ``shardtune train ...`` console script.

    Only the first ``-m`` counts: a torchrun agent's command line also contains
    ``-m shardtune train``, but after ``-m torch.distributed.run`` or ``-m shardtune launch``.
    """
    if "-m" in argv:
        i = argv.index("-m")
        return argv[i + 1 : i + 3] == ["shardtune", "train"]
    for i, arg in enumerate(argv[:2]):
        if os.path.basename(arg) == "shardtune":
            return argv[i + 1 : i + 2] == ["train"]
    return False


def is_trainer_process(pid: int) -> bool:
    """A trainer started with exec (its command line) or forked by ``shardtune launch`` (which
    leaves the launcher's command line and renames the process: ``launch.forked``)."""
    comm = (_read(PROC / str(pid) / "comm") or b"").strip().decode(errors="replace")
    return comm == TRAINER_PROCESS_NAME or is_trainer_command(_argv(pid))


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:  # the process ended, or is not ours to read
        return None


def _argv(pid: int) -> list[str]:
    raw = _read(PROC / str(pid) / "cmdline") or b""
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _parent(pid: int) -> int:
    stat = (_read(PROC / str(pid) / "stat") or b"").decode(errors="replace")
    # The command name in field 2 may contain spaces and parentheses: split after the last ")".
    fields = stat.rpartition(")")[2].split()
    return int(fields[1]) if len(fields) > 1 else 0


def catches_signal(pid: int, signum: int) -> bool:
    for line in (_read(PROC / str(pid) / "status") or b"").decode(errors="replace").splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False


def _environ(pid: int, *names: str) -> tuple[str | None, ...]:
    found = {}
    for entry in (_read(PROC / str(pid) / "environ") or b"").split(b"\0"):
        name, _, value = entry.decode(errors="replace").partition("=")
        found[name] = value
    return tuple(found.get(name) for name in names)


def _belongs(pid: int, job_id: str | None, node: str | None) -> bool:
    # The node check matters where several SLURM nodes share one kernel (emulated clusters,
    # multiple-slurmd setups): there /proc shows the other nodes' trainers too.
    their_job, their_node = _environ(pid, "SLURM_JOB_ID", "SLURMD_NODENAME")
    return (job_id is None or their_job == job_id) and (node is None or their_node in (None, node))


def find_trainers(signum: int, job_id: str | None, node: str | None = None) -> list[Trainer]:
    pids = (int(entry.name) for entry in PROC.iterdir() if entry.name.isdigit())
    candidates = {pid for pid in pids if pid != os.getpid() and is_trainer_process(pid)}
    return [
        Trainer(pid, catches_signal(pid, signum))
        for pid in sorted(candidates)
        if _parent(pid) not in candidates and _belongs(pid, job_id, node)
    ]


def signal_trainers(signum: int, job_id: str | None, wait_s: float = 30.0, poll_s: float = 0.5) -> int:
    """Signal every trainer of ``job_id`` on this node; returns how many were signalled."""
    deadline = time.monotonic() + wait_s
    signalled: set[int] = set()
    host = os.uname().nodename
    node = os.environ.get("SLURMD_NODENAME")
    while True:
        trainers = [t for t in find_trainers(signum, job_id, node) if t.pid not in signalled]
        for t in trainers:
            if t.catches:
                try:
                    os.kill(t.pid, signum)
                except ProcessLookupError:  # it finished meanwhile
                    continue
                signalled.add(t.pid)
                print(f"{host}: sent {signal.Signals(signum).name} to trainer pid {t.pid}", flush=True)
        waiting = [t.pid for t in trainers if not t.catches]
        if (signalled and not waiting) or time.monotonic() >= deadline:
            break
        time.sleep(poll_s)
    if waiting:
        print(f"{host}: trainer pid(s) {waiting} never installed a {signal.Signals(signum).name} handler; "
              "left running", flush=True)
    if not signalled and not waiting:
        print(f"{host}: no shardtune trainer of job {job_id or '(any)'} found", flush=True)
    return len(signalled)


# -- the local launcher's side: its own workers only ---------------------------------------------

LAUNCHER_PID_ENV = "SHARDTUNE_LAUNCHER_PID"
_PR_SET_PDEATHSIG = 1


def worker_trainers(parent: int) -> list[Trainer]:
    """The trainers this launcher started (its direct children running ``shardtune train``)."""
    pids = (int(entry.name) for entry in PROC.iterdir() if entry.name.isdigit())
    return [Trainer(pid, True) for pid in sorted(pids) if _parent(pid) == parent and is_trainer_process(pid)]


def forward_to_workers(signum: int, parent: int, wait_s: float = 30.0, poll_s: float = 0.2, *,
                       force: bool = False) -> int:
    """Pass a signal the launcher got on to its trainers. torchrun puts each worker in its own
    session, so a Ctrl-C or a SIGTERM to the launcher's process group never reaches them. A
    trainer still starting up (no handler yet) is waited for: the default action would kill it
    instead of saving. With ``force`` (a second Ctrl-C) each gets SIGKILL: a trainer blocked in a
    collective (a peer stalled, often why Ctrl-C is pressed twice) runs no Python signal handler
    until the collective times out, so the trainer's own "second SIGINT aborts" never fires there.
    A save cut short stays a ``.tmp-*`` directory. Returns how many were signalled."""
    deadline = time.monotonic() + wait_s
    signalled: set[int] = set()
    sent = signal.SIGKILL if force else signum
    while True:
        pending = [t.pid for t in worker_trainers(parent) if t.pid not in signalled]
        for pid in pending:
            if force or catches_signal(pid, signum):
                try:
                    os.kill(pid, sent)
                    signalled.add(pid)
                except ProcessLookupError:
                    pass
        if (signalled and not [p for p in pending if p not in signalled]) or time.monotonic() >= deadline:
            return len(signalled)
        time.sleep(poll_s)


def die_with_launcher() -> None:
    """In a trainer started by a launcher (shardtune launch, or torchrun): die with it.

    Without this, killing the launcher (kill -9, an OOM kill, a lost node agent) left both
    trainers running for seconds and once committing a checkpoint with no launcher left; an
    immediate relaunch then had two sets of trainers in one run directory. The kernel sends
    SIGKILL when the parent exits (PR_SET_PDEATHSIG); a watchdog thread on the parent pid covers
    a parent that died before the call. SIGKILL, not a stop signal: a save it cuts short stays
    an uncommitted ``.tmp-*`` directory, and the last committed checkpoint stands.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ and LAUNCHER_PID_ENV not in os.environ:
        return  # started by hand: its parent is a shell
    parent = os.getppid()
    expected = os.environ.get(LAUNCHER_PID_ENV)
    if expected is not None and expected.isdigit() and int(expected) != parent and \
            not _is_descendant_of(parent, int(expected)):
        os._exit(1)  # the launcher is already gone
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the watchdog alone
        pass
    if os.getppid() != parent:  # died between getppid and prctl
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="shardtune-launcher-watchdog", daemon=True).start()


def _is_descendant_of(pid: int, ancestor: int) -> bool:
    for _ in range(8):  # plain torchrun under shardtune launch: agent -> worker
        if pid in (0, 1):
            return False
        if pid == ancestor:
            return True
        pid = _parent(pid)
    return False
