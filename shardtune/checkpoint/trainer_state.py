"""What a checkpoint holds besides tensors: each stateful part's ``state_dict``, as plain JSON.

The checkpointer is handed these parts when it is built and asks them for their state at every save
and gives it back on resume, so the loop only ever says ``checkpointer.save(step)``.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from typing import Protocol

import torch


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class TrainProgress:
    """Where the run is: the last finished optimizer step and the tokens consumed up to it."""

    step: int = 0
    tokens_seen: int = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])


class TrainerState:
    """``progress`` sits at the top level of trainer_state.json (``step``, ``tokens_seen``); every
    other part under its own name (``loader``, ``scheduler``, ``eval``), beside the run config and
    the versions that wrote it."""

    def __init__(self, progress: TrainProgress, parts: dict[str, Stateful], config: dict):
        self.progress = progress
        self.parts = parts
        self.config = config

    def state_dict(self) -> dict:
        import shardtune

        return {
            **self.progress.state_dict(),
            **{name: part.state_dict() for name, part in self.parts.items()},
            "config": self.config,
            "versions": {
                "shardtune": shardtune.__version__, "torch": torch.__version__,
                "python": platform.python_version(),
            },
        }

    def load_state_dict(self, state: dict) -> None:
        self.progress.load_state_dict(state)
        for name, part in self.parts.items():
            if state.get(name) is not None:  # e.g. no "eval" in a run that never evaluated
                part.load_state_dict(state[name])
