"""Prepared shards: round trip, checksums, caching, memory-mapped source, elastic exact resume."""

from __future__ import annotations

import hashlib
import json
import random

import numpy as np
import pytest

from shardtune.config import DataSection, PrepareSection
from shardtune.data.corpus import build_sources
from shardtune.data.encoder import DocumentEncoder, resolve_chat_template
from shardtune.data.loader import GlobalBatchLoader
from shardtune.data.packing import IGNORE_INDEX, PackedEpoch, TokenizedCorpus
from shardtune.data.prepare import prepare_dataset
from shardtune.data.records import RecordRules, parse_record
from shardtune.data.shards import PreparedSource, open_corpus, token_dtype
from shardtune.data.tokenizer import train_tokenizer
from shardtune.errors import ShardError

WORDS = "one two three four five six seven eight nine ten eleven twelve red green blue white".split()
ALL_TRAIN = {"train": 1.0, "validation": 0.0, "test": 0.0}


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choices(WORDS, k=n))


def make_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for i in range(n):
        if i % 3 == 0:
            records.append({"messages": [{"role": "user", "content": sentence(rng, rng.randint(5, 15))},
                                         {"role": "assistant", "content": sentence(rng, rng.randint(5, 30))}]})
        elif i % 3 == 1:
            records.append({"prompt": sentence(rng, rng.randint(5, 12)), "completion": sentence(rng, rng.randint(5, 25))})
        else:
            records.append({"text": sentence(rng, rng.randint(5, 40))})
    return records


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    rng = random.Random(0)
    return train_tokenizer([sentence(rng, 30) for _ in range(200)] + ["<|user|> <|assistant|>"], 300,
                           tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tokenizer):
    """240 records in several small shards."""
    root = tmp_path_factory.mktemp("prep")
    path = root / "in.jsonl"
    records = make_records(240)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    settings = PrepareSection(progress=False, splits=ALL_TRAIN, shard_tokens=2000)
    result = prepare_dataset(settings, root / "out", inputs=[str(path)], tokenizer=tokenizer)
    return result, records, path, settings


def test_shards_round_trip_tokens_and_offsets(prepared, tokenizer):
    result, records, _, _ = prepared
    shards = result.manifest["splits"]["train"]["shards"]
    assert len(shards) > 2  # the fixture exercises documents spread over several shards
    corpus = open_corpus(result.out_dir, result.manifest, "train")
    # Expected: the same records encoded directly, in input order (no dedup drops here).
    rules = RecordRules()
    parsed = [parse_record(r, f"in:{i}", rules) for i, r in enumerate(records)]
    encoder = DocumentEncoder(tokenizer, resolve_chat_template(tokenizer, None)[0])
    expected = encoder.encode(parsed)
    assert corpus.num_documents == len(records)
    assert corpus.doc_lengths.tolist() == [len(ids) for ids, _ in expected]
    assert corpus.doc_offsets.tolist() == np.concatenate([[0], np.cumsum(corpus.doc_lengths)[:-1]]).tolist()
    for doc, (ids, mask) in enumerate(expected):
        start, length = int(corpus.doc_offsets[doc]), int(corpus.doc_lengths[doc])
        assert np.array_equal(corpus.tokens[start : start + length], ids)
        assert np.array_equal(corpus.loss_mask[start : start + length], mask)
        assert corpus.prompt_lengths[doc] == int(np.argmax(mask))
    assert corpus.tokens.dtype == np.uint16
    assert all(isinstance(p, np.memmap) for p in corpus.tokens.parts)  # memory-mapped, not loaded
    assert result.manifest["splits"]["train"]["tokens"] == corpus.num_tokens


def test_token_dtype_follows_vocabulary_size():
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_loss_mask_reaches_packed_labels():
    tokens = np.arange(1, 13, dtype=np.uint16)
    corpus = TokenizedCorpus(tokens, np.array([0, 6]), np.array([6, 6]), np.array([0, 0]),
                             loss_mask=np.array([1, 1, 0, 0, 1, 1, 1, 0, 1, 1, 1, 1], dtype=np.uint8))
    epoch = PackedEpoch(corpus, 12, seed=0, epoch=0)
    sample = epoch[0]
    masked = sample["labels"] == IGNORE_INDEX
    expected = np.isin(sample["input_ids"], [3, 4, 8, 1, 7])  # mask zeros, plus each document's first token
    assert np.array_equal(masked, expected)


def test_rerun_is_a_cache_hit(prepared, tokenizer):
    result, _, path, settings = prepared
    files = sorted(result.out_dir.rglob("*.npy"))
    mtimes = [f.stat().st_mtime_ns for f in files]
    again = prepare_dataset(settings, result.out_dir, inputs=[str(path)], tokenizer=tokenizer)
    assert again.cached and again.manifest == result.manifest
    assert [f.stat().st_mtime_ns for f in files] == mtimes


def test_changed_settings_or_inputs_rebuild(tmp_path, tokenizer):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in make_records(30)))
    settings = PrepareSection(progress=False, splits=ALL_TRAIN)
    first = prepare_dataset(settings, tmp_path / "out", inputs=[str(path)], tokenizer=tokenizer)
    changed = PrepareSection(progress=False, splits=ALL_TRAIN, max_tokens=20, overlong="truncate")
    assert not prepare_dataset(changed, tmp_path / "out", inputs=[str(path)], tokenizer=tokenizer).cached
    with path.open("a") as fh:
        fh.write(json.dumps({"text": "a brand new record with enough words in it"}) + "\n")
    rebuilt = prepare_dataset(settings, tmp_path / "out", inputs=[str(path)], tokenizer=tokenizer)
    assert not rebuilt.cached
    assert rebuilt.manifest["fingerprint"] != first.manifest["fingerprint"]
    assert rebuilt.report["records_read"] == 31


def test_corrupted_shard_is_detected_by_checksum(tmp_path, prepared, tokenizer):
    result, _, path, settings = prepared
    out = tmp_path / "copy"
    prepare_dataset(settings, out, inputs=[str(path)], tokenizer=tokenizer)
    victim = out / result.manifest["splits"]["train"]["shards"][1]["path"] / "tokens.npy"
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0xFF  # same size, one token changed
    victim.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=rf"corrupted shard file {victim}"):
        PreparedSource(out, "train", seq_len=32, seed=0)
    # prepare notices too, and rebuilds instead of calling it a cache hit.
    rebuilt = prepare_dataset(settings, out, inputs=[str(path)], tokenizer=tokenizer)
    assert not rebuilt.cached
    PreparedSource(out, "train", seq_len=32, seed=0)


def test_build_sources_reads_prepared_shards(prepared, tokenizer, tmp_path):
    result = prepared[0]
    cfg = DataSection(source="prepared", prepared_dir=str(result.out_dir), seq_len=32)
    train, val = build_sources(cfg, tokenizer, seed=3)
    assert isinstance(train, PreparedSource) and len(train.epoch(0)) > 0
    other = train_tokenizer(["entirely different text"] * 50, 280, tmp_path / "other")
    with pytest.raises(ShardError, match="another tokenizer"):
        build_sources(cfg, other, seed=3)


def _sample_hash(input_ids) -> str:
    return hashlib.sha1(np.ascontiguousarray(np.asarray(input_ids), dtype=np.int64).tobytes()).hexdigest()


def _global_steps(loaders: list[GlobalBatchLoader], max_steps: int | None = None) -> list[list[str]]:
    """Run all ranks in lockstep; each step is the concatenation of rank 0, 1, ... blocks."""
    steps = []
    while max_steps is None or len(steps) < max_steps:
        per_rank = [loader.next_step() for loader in loaders]
        if per_rank[0] is None:
            assert all(p is None for p in per_rank)
            return steps
        steps.append([_sample_hash(row) for batches in per_rank for mb in batches for row in mb["input_ids"]])
    return steps


def _loaders(source, world_size: int, state=None) -> list[GlobalBatchLoader]:
    loaders = []
    for rank in range(world_size):
        loader = GlobalBatchLoader(source, global_batch_size=6, micro_batch_size=1, rank=rank,
                                   world_size=world_size, max_epochs=1)
        if state is not None:
            loader.load_state_dict(state)
        loaders.append(loader)
    return loaders


@pytest.mark.parametrize("resume_world_size", [1, 2, 3])
def test_exact_resume_across_world_sizes(prepared, resume_world_size):
    result = prepared[0]
    source = PreparedSource(result.out_dir, "train", seq_len=32, seed=11)
    reference = _global_steps(_loaders(source, 1))
    assert len(reference) > 20
    stop_at = 7
    first = _loaders(source, 2)
    before = _global_steps(first, max_steps=stop_at)
    state = json.loads(json.dumps(first[0].state_dict()))  # what a checkpoint would hold
    assert all(loader.state_dict() == state for loader in first)
    # A fresh source, as after a restart: nothing carried over but the tiny state.
    resumed_source = PreparedSource(result.out_dir, "train", seq_len=32, seed=11)
    after = _global_steps(_loaders(resumed_source, resume_world_size, state))
    assert before + after == reference
    seen = [h for step in before + after for h in step]
    assert len(seen) == len(set(seen))  # none repeated
    # None missing: exactly the epoch's sequences in order, up to the partial last global batch.
    epoch = source.epoch(0)
    assert seen == [_sample_hash(epoch[k]["input_ids"]) for k in range(len(reference) * 6)]
    assert len(epoch) - len(seen) < 6
