"""The global order depends on (seed, epoch, lengths) only: not on ranks or micro-batches."""

from __future__ import annotations

import numpy as np
import pytest

from shardtune.data.loader import GlobalBatchLoader
from shardtune.data.packing import IGNORE_INDEX, PackedEpoch, TokenizedCorpus


def corpus(num_docs: int = 60, seed: int = 0) -> TokenizedCorpus:
    rng = np.random.default_rng(seed)
    docs, prompts = [], []
    for d in range(num_docs):
        length = int(rng.integers(5, 40))
        # Token value encodes (document, position) so a test can tell where every token came from.
        docs.append([d * 100 + i for i in range(length)])
        prompts.append(int(rng.integers(1, length)))
    return TokenizedCorpus.from_documents(docs, prompts, vocab_size=10_000)


class Source:
    def __init__(self, c: TokenizedCorpus, seq_len: int = 16, seed: int = 3):
        self.c, self.seq_len, self.seed = c, seq_len, seed

    def epoch(self, epoch: int) -> PackedEpoch:
        return PackedEpoch(self.c, self.seq_len, self.seed, epoch)


def global_steps(world: int, micro: int, steps: int, global_batch: int = 6, state=None):
    """Per step, the concatenation of every rank's sequences in rank order."""
    src = Source(corpus())
    loaders = [
        GlobalBatchLoader(src, global_batch_size=global_batch, micro_batch_size=micro, rank=r, world_size=world)
        for r in range(world)
    ]
    if state is not None:
        for loader in loaders:
            loader.load_state_dict(state)
    out = []
    for _ in range(steps):
        per_rank = [loader.next_step() for loader in loaders]
        seqs = [row for mbs in per_rank for mb in mbs for row in mb["input_ids"].tolist()]
        out.append(seqs)
    return out, loaders[0].state_dict()


@pytest.mark.parametrize("world, micro", [(2, 1), (2, 3), (3, 1), (3, 2), (6, 1)])
def test_global_order_is_independent_of_world_size_and_micro_batch(world, micro):
    reference, _ = global_steps(world=1, micro=2, steps=12)
    got, _ = global_steps(world=world, micro=micro, steps=12)
    assert got == reference


@pytest.mark.parametrize("new_world", [1, 3])
def test_resume_on_another_world_size_continues_exactly(new_world):
    # Crossing an epoch boundary on the way (an epoch here is ~8 global steps).
    uninterrupted, _ = global_steps(world=2, micro=1, steps=20)
    first, state = global_steps(world=2, micro=3, steps=7)
    rest, _ = global_steps(world=new_world, micro=1, steps=13, state=state)
    assert first + rest == uninterrupted


def test_epochs_are_reshuffled_and_cover_every_full_window():
    src = Source(corpus())
    e0, e1 = src.epoch(0), src.epoch(1)
    assert [e0[k]["input_ids"].tolist() for k in range(3)] != [e1[k]["input_ids"].tolist() for k in range(3)]
    # Concatenating an epoch's windows reproduces its permuted document stream.
    stream = np.concatenate([e0[k]["input_ids"] for k in range(len(e0))])
    docs = np.concatenate([src.c.tokens[src.c.doc_offsets[d]: src.c.doc_offsets[d] + src.c.doc_lengths[d]] for d in e0.order])
    assert np.array_equal(stream, docs[: len(stream)])


def test_packed_positions_restart_and_prompts_are_masked():
    c = corpus()
    epoch = PackedEpoch(c, 64, seed=3, epoch=0)
    for k in range(len(epoch)):
        sample = epoch[k]
        ids, pos, labels = sample["input_ids"], sample["position_ids"], sample["labels"]
        doc, within = ids // 100, ids % 100
        assert np.array_equal(pos, within), "position_ids must count from each document's start"
        prompt_len = c.prompt_lengths[doc]
        expect_masked = (within < prompt_len) | (within == 0)
        assert np.array_equal(labels == IGNORE_INDEX, expect_masked)
        assert np.array_equal(labels[~expect_masked], ids[~expect_masked])


def test_bad_batch_split_is_rejected():
    with pytest.raises(ValueError, match="global_batch_size=8 must split into 3 ranks"):
        GlobalBatchLoader(Source(corpus()), global_batch_size=8, micro_batch_size=1, rank=0, world_size=3)
