"""Fault injection for the fault-tolerance tests, driven by environment variables.

Production runs set none of these and get ``NO_FAULTS``, whose hooks do nothing; the variables are
read once, when the process starts.
``step:rank`` lists are comma-separated; a rank of ``*`` matches every rank.

* ``SHARDTUNE_FAULT_NONFINITE=3:1``    rank 1's loss at step 3 becomes NaN (and its gradients)
* ``SHARDTUNE_FAULT_GRAD=3:1:inf``     rank 1's loss at step 3 stays finite but its backward
  yields non-finite gradients (``nan`` or ``inf``), before they are reduced across ranks
* ``SHARDTUNE_FAULT_GRAD_REPLICA=3:1`` after step 3's backward (and its gradient reduction),
  one element of rank 1's own gradients becomes NaN: a corrupted copy the other ranks never see
* ``SHARDTUNE_FAULT_KILL=5:0``         rank 0 SIGKILLs itself at step 5, on the first attempt only
* ``SHARDTUNE_FAULT_STALL=4:1:600``    rank 1 sleeps 600 s at step 4, just before the step's sync, dying of a SIGTERM meanwhile
* ``SHARDTUNE_FAULT_SAVE=after_write:4`` every rank SIGKILLs itself at that point of step 4's save
  (``before_staging``, ``after_write``, ``before_rename``, ``before_latest``)
* ``SHARDTUNE_FAULT_SIGNAL=eval:4:1:SIGTERM`` rank 1 sends itself SIGTERM (default SIGUSR1)
  at that moment of step 4: ``eval`` (after the first batch of the evaluation that follows
  the step), ``save`` (while the checkpoint's shards are written: before a synchronous
  write, or once the asynchronous one is in flight), ``commit`` (writes done, not yet
  renamed). A preempted job's scheduler signals at any such moment.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Mapping

import torch

_VARIABLES = ("NONFINITE", "GRAD", "GRAD_REPLICA", "KILL", "STALL", "SAVE", "SIGNAL")


def _value(extra: list[str]) -> float:
    kind = extra[0] if extra else "nan"
    if kind not in ("nan", "inf"):
        raise ValueError(f"fault value must be nan or inf, not {kind!r}")
    return float(kind)


class _PoisonBackward(torch.autograd.Function):
    """Identity forward; the gradient flowing back is multiplied by a non-finite value."""

    @staticmethod
    def forward(ctx, loss, value):
        ctx.value = value
        return loss.view_as(loss)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.value, None


class FaultHooks:
    """The injection points the loop, the evaluator and the checkpointer call, from one spec."""

    def __init__(self, spec: Mapping[str, str], first_attempt: bool = True):
        self.spec = {k: v for k, v in spec.items() if v}
        self.first_attempt = first_attempt
        # The step the loop is in, for hooks reached from code that does not know it (evaluation).
        self.current_step = 0

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> FaultHooks:
        spec = {name: environ.get(f"SHARDTUNE_FAULT_{name}", "") for name in _VARIABLES}
        if not any(spec.values()):
            return NO_FAULTS
        return cls(spec, first_attempt=environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0")

    def _matches(self, name: str, step: int, rank: int) -> list[str] | None:
        for item in self.spec.get(name, "").split(",") if name in self.spec else ():
            parts = item.split(":")
            if parts[0] == str(step) and parts[1:2] in ([str(rank)], ["*"]):
                return parts[2:]
        return None

    def step_begins(self, step: int, rank: int) -> None:
        self.current_step = step
        # Only on torchrun's first attempt: the restarted group must get past the step.
        if self.first_attempt and self._matches("KILL", step, rank) is not None:
            os.kill(os.getpid(), signal.SIGKILL)

    def nonfinite_loss(self, loss: torch.Tensor, step: int, rank: int) -> torch.Tensor:
        return loss * float("nan") if self._matches("NONFINITE", step, rank) is not None else loss

    def poison_backward(self, loss: torch.Tensor, step: int, rank: int) -> torch.Tensor:
        extra = self._matches("GRAD", step, rank)
        return loss if extra is None else _PoisonBackward.apply(loss, _value(extra))

    def corrupt_gradient_replica(self, step: int, rank: int, params) -> None:
        extra = self._matches("GRAD_REPLICA", step, rank)
        if extra is None:
            return
        for p in params:
            grad = p.grad
            if grad is None:
                continue
            local = grad.to_local() if hasattr(grad, "to_local") else grad  # an FSDP2 shard
            if local.numel():
                local.view(-1)[0] = _value(extra)
                return
        # ZeRO keeps reduced gradients inside DeepSpeed's partitions, not on the parameters.
        raise RuntimeError("SHARDTUNE_FAULT_GRAD_REPLICA: this strategy keeps no gradient on its parameters")

    def maybe_stall(self, step: int, rank: int) -> None:
        extra = self._matches("STALL", step, rank)
        if extra is not None:
            # The stalled rank dies of the SIGTERM that ends the group once the others have
            # named it and exited: its save-and-stop handler would only set a flag that a
            # sleeping rank never reads, and the teardown would wait out torchrun's 30 s grace.
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            time.sleep(float(extra[0]) if extra else 3600.0)

    def kill_point(self, name: str, step: int) -> None:
        if self.spec.get("SAVE") == f"{name}:{step}":
            os.kill(os.getpid(), signal.SIGKILL)

    def signal_point(self, point: str, rank: int, step: int | None = None) -> None:
        if "SIGNAL" not in self.spec:
            return
        step = self.current_step if step is None else step
        for item in self.spec["SIGNAL"].split(","):
            parts = item.split(":")
            if parts[:2] == [point, str(step)] and parts[2:3] in ([str(rank)], ["*"]):
                name = parts[3] if len(parts) > 3 else "SIGUSR1"
                # Delivered to this process as a scheduler would; the handler runs right away.
                os.kill(os.getpid(), signal.Signals[name])
                return


NO_FAULTS = FaultHooks({})
# What this process injects: read once from its environment (set by the fault tests).
_process_hooks: tuple[int, FaultHooks] | None = None


def hooks() -> FaultHooks:
    """This process's hooks, read from its environment on first use. Not at import: a worker
    forked from ``shardtune launch`` inherits the launcher's imported modules, but its
    environment (``TORCHELASTIC_RESTART_COUNT`` above all) is set only after the fork."""
    global _process_hooks
    if _process_hooks is None or _process_hooks[0] != os.getpid():
        _process_hooks = (os.getpid(), FaultHooks.from_environment())
    return _process_hooks[1]
