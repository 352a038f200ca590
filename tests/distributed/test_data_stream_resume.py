"""The streaming data path: whole-document packing, background prefetch, weighted mixing, and
exact resume of all three at the same and another world size.

Token values encode where they came from (source, document, position), so every test can
tell which document, and which part of it, each sequence holds.
"""

from __future__ import annotations

import json

import pytest
from conftest import losses_by_step, run_shardtune

from shardtune.data.synthetic import generate_records


@pytest.mark.distributed
def test_real_run_with_prefetch_resumes_on_one_rank(tmp_path):
    """2 ranks with prefetch workers, a two-source mixture and whole-document packing, stopped at
    step 3 and resumed on 1 rank without workers: the losses are an uninterrupted run's (1 rank,
    so that this test launches four processes, not five)."""
    for name, n, seed in (("tasks", 400, 1), ("extra", 150, 2)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in generate_records(n, seed)))
    data = [f"data.mixture=[{{path: {tmp_path / 'tasks.jsonl'}, weight: 3}}, "
            f"{{path: {tmp_path / 'extra.jsonl'}, weight: 1}}]",
            "data.packing=whole_documents", "data.seq_len=64", "train.max_steps=6", "eval.every=null"]
    full = run_shardtune(tmp_path / "full", *data, "data.num_workers=2", nproc=1)
    run_shardtune(tmp_path / "cut", *data, "data.num_workers=2", "train.stop_at_step=3", nproc=2)
    resumed = run_shardtune(tmp_path / "cut", *data, "data.num_workers=0", nproc=1)
    assert resumed.result["resumed_from"].endswith("step-00000003")
    expected, got = losses_by_step(tmp_path / "full"), losses_by_step(tmp_path / "cut")
    assert sorted(got) == sorted(expected) == list(range(1, 7))
    for step in range(1, 7):
        # The world sizes differ, so reductions run in another order: ~1e-7 apart, where other
        # data moves a loss by >1e-2.
        assert got[step] == pytest.approx(expected[step], rel=1e-5), step
    summary = json.loads((tmp_path / "full" / "data_summary.json").read_text())
    counts = {row["name"]: row["sequences_per_epoch"] for row in summary["mixture"]}
    assert abs(counts["tasks.jsonl"] / sum(counts.values()) - 0.75) < 0.01
    assert full.result["stopped_reason"] == "completed"
