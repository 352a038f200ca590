"""Fixtures shared by the fault tests: one small genuine run, built once per session."""

from __future__ import annotations

import pytest
from conftest import run_shardtune


@pytest.fixture(scope="session")
def small_run(tmp_path_factory):
    """A finished 1-rank run with checkpoints at steps 1 and 2. Copy it before changing it."""
    out = tmp_path_factory.mktemp("small-run")
    run_shardtune(out, "train.max_steps=2", "checkpoint.every_steps=1")
    return out
