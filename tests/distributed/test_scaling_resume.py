"""Many ranks and the GPU throughput options: a 4-rank checkpoint resumed at 2 and 3 ranks
continues the uninterrupted run, checkpoint metadata grows at most linearly in ranks, and
activation checkpointing, torch.compile and the FSDP2 settings do what their keys say."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import losses_by_step, run_shardtune

BATCH = ("train.global_batch_size=12", "train.micro_batch_size=1")
# Same bound as test_checkpoint.py: another world size reduces in another order (~1e-7).
RESHARD_REL_TOLERANCE = 1e-5


@pytest.mark.distributed
def test_four_rank_checkpoint_resumes_at_two_and_three_ranks(tmp_path):
    # One uninterrupted 4-rank run also writes the step-4 checkpoint the others resume from.
    full = tmp_path / "x4"
    run_shardtune(full, *BATCH, "distributed.strategy=fsdp", "checkpoint.every_steps=4",
                  "checkpoint.async_save=false", "eval.save_best=false", nproc=4)
    uninterrupted = losses_by_step(full)
    source = full / "checkpoints" / "step-00000004"
    metadata, manifest = {4: (full / "checkpoints" / "step-00000008")}, {}
    for nproc in (2, 3):
        out = tmp_path / f"x{nproc}"
        copy = tmp_path / f"from4-for{nproc}"
        shutil.copytree(source, copy)
        resumed = run_shardtune(out, *BATCH, "distributed.strategy=fsdp", f"checkpoint.resume={copy}",
                                "eval.save_best=false", nproc=nproc)
        assert resumed.result["resumed_from"] == str(copy)
        losses = losses_by_step(out)
        assert sorted(losses) == [5, 6, 7, 8]
        for step in range(5, 9):
            assert losses[step] == pytest.approx(uninterrupted[step], rel=RESHARD_REL_TOLERANCE), (nproc, step)
        metadata[nproc] = out / "checkpoints" / "step-00000008"

    # Checkpoint bookkeeping written by rank 0 must grow at most linearly with the shards:
    # FSDP2 splits every tensor into one chunk per rank, so 4 ranks may hold up to twice the
    # chunk entries of 2 ranks, never more.
    sizes = {n: ((d / ".metadata").stat().st_size, (d / "manifest.json").stat().st_size) for n, d in metadata.items()}
    for which in (0, 1):
        assert sizes[2][which] < sizes[3][which] < sizes[4][which] <= 2 * sizes[2][which], sizes
    manifest = json.loads((metadata[4] / "manifest.json").read_text())
    assert manifest["world_size"] == 4 and len([f for f in manifest["files"] if f.endswith(".distcp")]) == 4
