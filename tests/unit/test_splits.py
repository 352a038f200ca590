"""One split rule for every data path: a record read straight from JSONL by a run lands in the same
split as when ``data prepare`` shards it."""

from __future__ import annotations

import json
import random

import numpy as np

from shardtune.config import PrepareSection, SplitRatios
from shardtune.data.corpus import read_jsonl_records
from shardtune.data.prepare import prepare_dataset
from shardtune.data.splits import SPLITS, assign_split, dict_record_digest, split_records
from shardtune.data.tokenizer import train_tokenizer

WORDS = "alpha beta gamma delta river stone cloud amber quiet north".split()


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choices(WORDS, k=n))


def test_direct_jsonl_and_data_prepare_put_each_record_in_the_same_split(tmp_path):
    rng = random.Random(3)
    records = [{"prompt": _sentence(rng, 6), "completion": _sentence(rng, 5)} for _ in range(240)]
    records += [{"text": _sentence(rng, 12)} for _ in range(60)]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    ratios = {"train": 0.5, "validation": 0.25, "test": 0.25}
    tokenizer = train_tokenizer([_sentence(rng, 20) for _ in range(100)], 300, tmp_path / "tok")

    prepared = prepare_dataset(PrepareSection(progress=False, splits=ratios), tmp_path / "prep",
                               inputs=[str(path)], tokenizer=tokenizer)
    by_prepare = {}
    for split in SPLITS:
        for shard in prepared.manifest["splits"][split]["shards"]:
            for key in np.load(prepared.out_dir / shard["path"] / "doc_keys.npy"):
                by_prepare[int(key)] = split

    direct = dict(zip(SPLITS, split_records(read_jsonl_records(path), SplitRatios(**ratios)), strict=True))
    by_direct = {int.from_bytes(dict_record_digest(r)[:8], "big"): split for split, rs in direct.items() for r in rs}
    assert len(by_direct) == len(records)
    assert by_prepare == by_direct
    # Not a degenerate split: every split got a fair share of the 300 records.
    assert all(40 < sum(1 for s in by_direct.values() if s == split) < 200 for split in SPLITS)


def test_split_boundaries_follow_the_ratios():
    ratios = SplitRatios(train=0.6, validation=0.3, test=0.1)

    def digest(u: float) -> bytes:
        return bytes(8) + int(u * 2**64).to_bytes(8, "big")

    assert assign_split(digest(0.0), ratios) == "train"
    assert assign_split(digest(0.599), ratios) == "train"
    assert assign_split(digest(0.601), ratios) == "validation"
    assert assign_split(digest(0.899), ratios) == "validation"
    assert assign_split(digest(0.901), ratios) == "test"
