"""A corrupted, truncated or deleted prepared-data shard: a 2-rank training run stops before
its first step with one error naming the file, on every rank that gets to report it, and
neither hangs nor surfaces a numpy traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import run_shardtune

from shardtune.config import PrepareSection
from shardtune.data.prepare import prepare_dataset
from shardtune.data.shards import PreparedSource
from shardtune.data.synthetic import generate_records
from shardtune.errors import ShardError

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prepared")
    source = root / "records.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in generate_records(600, seed=3)))
    settings = PrepareSection(progress=False, shard_tokens=2000,
                              splits={"train": 0.9, "validation": 0.1, "test": 0.0})
    return prepare_dataset(settings, root / "out", inputs=[str(source)], tokenizer_vocab_size=512).out_dir


def damaged_copy(prepared: Path, tmp_path: Path, how: str) -> tuple[Path, Path]:
    copy = tmp_path / "data"
    shutil.copytree(prepared, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    assert len(manifest["splits"]["train"]["shards"]) >= 2
    victim = copy / manifest["splits"]["train"]["shards"][1]["path"] / "tokens.npy"
    data = victim.read_bytes()
    if how == "corrupt":  # same size, one token id changed
        victim.write_bytes(data[:-3] + bytes([data[-3] ^ 0xFF]) + data[-2:])
    elif how == "truncate":
        victim.write_bytes(data[: len(data) // 2])
    else:
        victim.unlink()
    return copy, victim


@pytest.mark.parametrize("how, checksums, expected", [
    ("corrupt", True, "corrupted shard file {victim}: sha256"),
    ("truncate", False, "truncated shard file {victim}: "),
    ("delete", True, "shard file missing: {victim}"),
])
def test_bad_data_shard_is_named_by_every_rank(prepared, tmp_path, how, checksums, expected):
    data, victim = damaged_copy(prepared, tmp_path, how)
    run = run_shardtune(
        tmp_path / "run", "data.source=prepared", f"data.prepared_dir={data}",
        f"tokenizer.name_or_path={data / 'tokenizer'}", f"data.verify_checksums={str(checksums).lower()}",
        nproc=2, expect_ok=False, timeout=120,
    )
    assert run.returncode != 0
    message = f"shardtune: data error: {expected.format(victim=victim)}"
    assert message in run.stderr, run.stderr[-3000:]
    assert "Traceback (most recent call last)" not in run.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or '"kind": "train"' not in (
        tmp_path / "run" / "metrics.jsonl").read_text()


def test_checksums_off_still_catches_what_numpy_would_trip_on(prepared, tmp_path):
    """Without checksums a same-size corruption goes unseen (the documented trade-off), but a
    damaged header or a file whose length disagrees with the manifest is still named."""
    data, victim = damaged_copy(prepared, tmp_path, "corrupt")
    PreparedSource(data, "train", seq_len=64, seed=0, verify=False)
    with pytest.raises(ShardError, match="corrupted shard file"):
        PreparedSource(data, "train", seq_len=64, seed=0)

    raw = bytearray(victim.read_bytes())
    raw[:6] = b"garbag"  # the .npy magic: np.load would raise its own ValueError
    victim.write_bytes(bytes(raw))
    with pytest.raises(ShardError, match=f"unreadable shard file {victim}"):
        PreparedSource(data, "train", seq_len=64, seed=0, verify=False)

    # A shard of the wrong length, in a manifest written before sizes were recorded.
    tokens = np.load(victim.with_name("loss_mask.npy"))
    np.save(victim, np.zeros(len(tokens) // 2, dtype=np.uint32))
    manifest = json.loads((data / "manifest.json").read_text())
    shard = manifest["splits"]["train"]["shards"][1]
    shard["bytes"].pop("tokens.npy")
    (data / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=f"shard file {victim} holds"):
        PreparedSource(data, "train", seq_len=64, seed=0, verify=False)
