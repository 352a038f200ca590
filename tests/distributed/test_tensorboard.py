"""Rank 0 alone writes metrics: one event file per run, with the expected scalars."""

from __future__ import annotations

import pytest
from conftest import run_shardtune

pytestmark = pytest.mark.distributed

EXPECTED_TAGS = {
    "train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/samples_per_s",
    "train/mfu", "train/peak_memory_mib", "val/loss", "load/peak_host_memory_mib",
}


def test_single_event_file_with_expected_tags(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = run_shardtune(tmp_path, "distributed.strategy=fsdp", nproc=2)
    event_files = list((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))
    assert len(event_files) == 1, event_files
    acc = EventAccumulator(str(event_files[0]))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert EXPECTED_TAGS <= tags, EXPECTED_TAGS - tags
    losses = [e.value for e in acc.Scalars("train/loss")]
    assert losses == pytest.approx(run.train_losses(), rel=1e-6)
    assert [e.step for e in acc.Scalars("val/loss")] == [0, 8]  # before and after training
    assert all(0 < e.value < 1 for e in acc.Scalars("train/mfu"))
    # The loading peak is logged once, and is the one result.json reports.
    (peak,) = acc.Scalars("load/peak_host_memory_mib")
    assert peak.value == pytest.approx(run.result["peak_host_memory_mib"]) and peak.value > 100
    # The progress bar and summary come from rank 0 only.
    assert run.stdout.count("finished: 8 steps") == 1
    assert "  model           llama built from model.config, full fine-tune, " in run.stdout  # which model
    assert "tensorboard --logdir" in run.stdout
