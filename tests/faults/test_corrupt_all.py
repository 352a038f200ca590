"""Every checkpoint corrupt (real bytes flipped on disk): a run asked to resume refuses instead of
silently starting at step 0; with checkpoint.resume=auto-or-fresh it starts fresh, and retention
counts only valid checkpoints, so the corrupt higher-numbered ones neither push out each new good
one nor get deleted, and `latest` always names a directory that exists.

And a checkpoint that only one rank finds bad: every rank stops at once with that rank's message
(not a closed connection on the others, not a collective timeout)."""

from __future__ import annotations

import json
import time

import pytest
from conftest import run_shardtune

from faults.hostile_corpus import _rehash
from shardtune.checkpoint.manifest import list_checkpoints, read_latest

pytestmark = pytest.mark.distributed


def _flip(path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0xFF
    path.write_bytes(bytes(data))


def test_all_corrupt_refuses_resume_then_auto_or_fresh_keeps_its_new_checkpoints(tmp_path):
    run_shardtune(tmp_path, "train.max_steps=6", "checkpoint.every_steps=2")
    ckpts = tmp_path / "checkpoints"
    assert [c.step for c in list_checkpoints(ckpts)] == [2, 4, 6]
    for c in list_checkpoints(ckpts):
        _flip(c.path / "__0_0.distcp")

    refused = run_shardtune(tmp_path, "train.max_steps=8", expect_ok=False)
    assert refused.returncode == 4, refused.stderr[-3000:]
    assert f"all 3 checkpoint(s) under {ckpts} are invalid" in refused.stderr
    assert "sha256 mismatch" in refused.stderr and "checkpoint.resume=auto-or-fresh" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert [c.step for c in list_checkpoints(ckpts)] == [2, 4, 6]  # nothing touched

    fresh = run_shardtune(tmp_path, "train.max_steps=3", "checkpoint.every_steps=1", "checkpoint.keep_last=1",
                          "checkpoint.resume=auto-or-fresh")
    assert fresh.result["resumed_from"] is None
    assert "starting fresh (checkpoint.resume=auto-or-fresh)" in fresh.stderr
    # Step 2 was rewritten whole by the fresh run; keep_last=1 among the valid ones keeps step 3,
    # and the corrupt 4 and 6 are reported, not counted, not deleted.
    assert [c.step for c in list_checkpoints(ckpts)] == [3, 4, 6]
    assert read_latest(ckpts) == "step-00000003" and (ckpts / "step-00000003").is_dir()
    assert "retention:" in fresh.stderr and "not counted and not deleted" in fresh.stderr


def test_load_failure_on_one_rank_stops_every_rank_at_once(tmp_path):
    # Rank 1's RNG file is valid JSON (so rank 0's checks before the load pass) but not an RNG
    # state: only rank 1 finds out, while loading. The manifest is re-hashed to match.
    run_shardtune(tmp_path, "train.max_steps=2", nproc=2)
    step = tmp_path / "checkpoints" / "step-00000002"
    (step / "rng" / "rank-00001.json").write_text(json.dumps({"python": [3, [1, 2], None], "numpy": [], "torch": ""}))
    _rehash(step)
    (tmp_path / "metrics.jsonl").unlink()
    start = time.monotonic()
    run = run_shardtune(tmp_path, "train.max_steps=4", "distributed.collective_timeout_s=300", nproc=2,
                        expect_ok=False)
    elapsed = time.monotonic() - start
    message = f"checkpoint error: rank 1: {step / 'rng' / 'rank-00001.json'}: not an RNG state"
    assert run.returncode == 4, run.stderr[-3000:]
    assert run.stderr.count(message) == 2, run.stderr[-3000:]  # rank 0 reports rank 1's reason too
    assert "Connection closed by peer" not in run.stderr and "Traceback" not in run.stderr
    assert elapsed < 240, elapsed  # start-up and the load, far from the 300 s collective timeout
