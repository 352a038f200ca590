"""Checkpoints: exact continuation, resharding across world sizes and strategies, crashes
during a save, corruption, export, and safe loading."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest
from conftest import ROOT, losses_by_step, run_env, run_shardtune

from shardtune.checkpoint.manifest import newest_valid_checkpoint

pytestmark = pytest.mark.distributed

# Global batch 12 splits over 1, 2 and 3 ranks.
BATCH = "train.global_batch_size=12"
# After a world-size or strategy change the gradient reductions run in another order;
# measured agreement is ~1e-7 relative over 4 steps, so 1e-5 catches any real divergence
# (a lost optimizer moment or a wrong LR moves the next loss by >1e-3).
RESHARD_REL_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[int, float]:
    out = tmp_path_factory.mktemp("uninterrupted")
    run_shardtune(out, BATCH, nproc=2)
    return losses_by_step(out)


def test_resume_is_bitwise_identical_on_same_world_and_strategy(tmp_path, uninterrupted):
    first = run_shardtune(tmp_path, BATCH, "train.stop_at_step=4", nproc=2)
    assert first.result["stopped_reason"] == "stop_at_step 4"
    second = run_shardtune(tmp_path, BATCH, nproc=2)
    assert second.result["resumed_from"].endswith("step-00000004")
    resumed = losses_by_step(tmp_path)
    for step in range(5, 9):
        assert resumed[step] == uninterrupted[step], f"step {step}: {resumed[step]!r} != {uninterrupted[step]!r}"


@pytest.mark.parametrize(
    "before, after",
    [
        (("fsdp", 2), ("zero3", 2)),
        (("zero3", 2), ("fsdp", 2)),
        (("zero2", 2), ("ddp", 3)),
        (("ddp", 2), ("ddp", 1)),
        (("ddp", 1), ("fsdp", 2)),
    ],
    ids=lambda s: f"{s[0]}x{s[1]}",
)
def test_resume_on_another_world_size_or_strategy(tmp_path, uninterrupted, before, after):
    run_shardtune(tmp_path, BATCH, f"distributed.strategy={before[0]}", "train.stop_at_step=4", nproc=before[1])
    second = run_shardtune(tmp_path, BATCH, f"distributed.strategy={after[0]}", nproc=after[1])
    assert second.result["resumed_from"].endswith("step-00000004")
    resumed = losses_by_step(tmp_path)
    for step in range(5, 9):
        assert resumed[step] == pytest.approx(uninterrupted[step], rel=RESHARD_REL_TOLERANCE), step


@pytest.mark.parametrize("point", ["before_staging", "after_write", "before_rename", "before_latest"])
def test_kill_during_save_leaves_previous_checkpoint_selected(tmp_path, uninterrupted, point):
    crashed = run_shardtune(
        tmp_path, BATCH, "checkpoint.every_steps=2", "train.stop_at_step=6", nproc=2,
        env={"SHARDTUNE_FAULT_SAVE": f"{point}:4"}, expect_ok=False,
    )
    assert crashed.returncode != 0
    ckpts = tmp_path / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step-00000002"
    verify = subprocess.run([sys.executable, "-m", "shardtune", "ckpt", "verify", str(ckpts)],
                            capture_output=True, text=True, env=run_env())
    # Everything committed verifies: nothing half-written is ever a checkpoint.
    assert verify.returncode == 0, verify.stdout + verify.stderr
    expected = "step-00000004" if point == "before_latest" else "step-00000002"
    # Killed before `latest` moved, step 4 was already renamed, complete and verifiable: the
    # newest valid checkpoint wins. Killed any earlier, step 4 never became a checkpoint.
    assert newest_valid_checkpoint(ckpts).name == expected
    if point == "before_rename":  # one full resume proves the selection is what training uses
        resumed = run_shardtune(tmp_path, BATCH, nproc=2)
        assert resumed.result["resumed_from"].endswith(expected)
        losses = losses_by_step(tmp_path)
        for step in range(3, 9):
            assert losses[step] == uninterrupted[step]


def test_corrupt_or_truncated_files_are_caught_and_skipped(tmp_path, uninterrupted):
    run_shardtune(tmp_path, BATCH, "checkpoint.every_steps=2", "train.stop_at_step=6", nproc=2)
    ckpts = tmp_path / "checkpoints"
    shard = ckpts / "step-00000006" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    truncated = ckpts / "step-00000004" / "__0_0.distcp"
    truncated.write_bytes(truncated.read_bytes()[:-100])

    verify = subprocess.run([sys.executable, "-m", "shardtune", "ckpt", "verify", str(ckpts)],
                            capture_output=True, text=True, env=run_env())
    assert verify.returncode == 4  # CheckpointError in the exit-code table
    assert f"{shard}: sha256 mismatch" in verify.stdout
    assert f"{truncated}:" in verify.stdout and "truncated" in verify.stdout

    resumed = run_shardtune(tmp_path, BATCH, nproc=2)
    assert resumed.result["resumed_from"].endswith("step-00000002")
    assert f"skipping checkpoint: {shard}: sha256 mismatch" in resumed.stderr
    losses = losses_by_step(tmp_path)
    assert all(losses[s] == uninterrupted[s] for s in range(3, 9))


def test_incompatible_model_names_first_mismatching_tensor(tmp_path):
    run_shardtune(tmp_path, BATCH, "train.stop_at_step=2", nproc=1)
    bad = run_shardtune(tmp_path, BATCH, "model.config.intermediate_size=96", nproc=1, expect_ok=False)
    assert bad.returncode == 4
    assert "does not fit this model: first mismatching tensor 'model.model.layers.0.mlp.gate_proj.weight'" in bad.stderr
    assert "[160, 64] in the checkpoint but [96, 64] in the model" in bad.stderr


def test_export_loads_with_from_pretrained_and_gives_the_same_logits(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shardtune.checkpoint.export import load_logical_tensors
    from shardtune.config import load_config
    from shardtune.data.tokenizer import load_tokenizer
    from shardtune.models.loading import build_model

    run_shardtune(tmp_path, BATCH, "train.max_steps=3", nproc=2)
    ckpt = tmp_path / "checkpoints" / "step-00000003"
    out = tmp_path / "hf"
    export = subprocess.run([sys.executable, "-m", "shardtune", "ckpt", "export", str(ckpt), str(out)],
                            capture_output=True, text=True, env=run_env(), cwd=ROOT)
    assert export.returncode == 0, export.stderr
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))

    exported = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    # The trained model, rebuilt the way training built it and filled from the checkpoint.
    cfg = load_config(ROOT / "tests" / "configs" / "tiny.yaml")
    trained = build_model(cfg.model, load_tokenizer(cfg.tokenizer, False, saved_dir=ckpt / "tokenizer"))
    trained.load_state_dict(load_logical_tensors(ckpt, "model."), strict=True)
    trained.eval()
    ids = torch.tensor([tokenizer("Add 12 and 30.\n42")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(exported(input_ids=ids).logits, trained(input_ids=ids).logits)
    assert exported.config.use_cache is True


def test_pickled_code_in_metadata_is_refused(tmp_path):
    from shardtune.checkpoint.safe_io import safe_load_metadata
    from shardtune.errors import UnsafeCheckpointError

    class Exploit:
        def __reduce__(self):
            return (subprocess.call, (["touch", str(tmp_path / "pwned")],))

    with pytest.raises(UnsafeCheckpointError, match="subprocess.call"):
        safe_load_metadata(pickle.dumps(Exploit()))
    assert not (tmp_path / "pwned").exists()


def test_offline_reshard_writes_m_files_with_identical_tensors_and_resumes(tmp_path, uninterrupted):
    import torch

    from shardtune.checkpoint.export import load_logical_tensors

    run_shardtune(tmp_path / "run", BATCH, "train.stop_at_step=4", nproc=2)
    source = tmp_path / "run" / "checkpoints" / "step-00000004"
    out = tmp_path / "three"
    done = subprocess.run([sys.executable, "-m", "shardtune", "ckpt", "reshard", str(source), str(out),
                           "--world-size", "3"], capture_output=True, text=True, env=run_env(), cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in out.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp", "__2_0.distcp"]
    for prefix in ("model.", "optim."):
        before, after = load_logical_tensors(source, prefix), load_logical_tensors(out, prefix)
        assert before.keys() == after.keys()
        assert all(torch.equal(before[k], after[k]) for k in before)
    resumed = run_shardtune(tmp_path / "resumed", BATCH, f"checkpoint.resume={out}", nproc=3)
    assert resumed.result["resumed_from"] == str(out)
    losses = losses_by_step(tmp_path / "resumed")
    for step in range(5, 9):
        assert losses[step] == pytest.approx(uninterrupted[step], rel=RESHARD_REL_TOLERANCE)
