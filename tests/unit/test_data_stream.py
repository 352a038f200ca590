"""The streaming data path: whole-document packing, background prefetch, weighted mixing, and
exact resume of all three at the same and another world size.

Token values encode where they came from (source, document, position), so every test can
tell which document, and which part of it, each sequence holds.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import traceback

import numpy as np
import pytest
from conftest import ROOT, TINY, run_env

from shardtune.config import DataSection, PrepareSection, load_config
from shardtune.data.corpus import InMemorySource, build_sources
from shardtune.data.datasets import build_datasets
from shardtune.data.loader import GlobalBatchLoader
from shardtune.data.mixture import MixedSource, MixtureComponent, quotas
from shardtune.data.packing import IGNORE_INDEX, PackedEpoch, TokenizedCorpus, WholeDocumentEpoch
from shardtune.data.prepare import prepare_dataset
from shardtune.data.tokenizer import train_tokenizer
from shardtune.errors import ConfigError

DOC, SRC = 1_000, 1_000_000  # token = source * SRC + document * DOC + position


def corpus(num_docs: int = 80, seed: int = 0, source: int = 0, max_len: int = 40,
           loss_mask: bool = False) -> TokenizedCorpus:
    rng = np.random.default_rng(seed)
    docs, prompts = [], []
    for d in range(num_docs):
        length = int(rng.integers(4, max_len))
        docs.append([source * SRC + d * DOC + i + 1 for i in range(length)])  # +1: 0 is padding
        prompts.append(int(rng.integers(1, length)))
    c = TokenizedCorpus.from_documents(docs, prompts, vocab_size=SRC * 10)
    if not loss_mask:
        return c
    # Multi-turn style: targets after the prompt, with untrained gaps (user turns) among them.
    mask = (rng.random(c.num_tokens) < 0.7).astype(np.uint8)
    return TokenizedCorpus(c.tokens, c.doc_offsets, c.doc_lengths, c.prompt_lengths, mask)


def where(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    t = np.asarray(tokens, dtype=np.int64) - 1
    return t // SRC, (t % SRC) // DOC, t % DOC


def mixed_source(packing: str = "whole_documents", seq_len: int = 32, seed: int = 3) -> MixedSource:
    parts = [MixtureComponent("small", corpus(30, seed=1, source=1), 3.0),
             MixtureComponent("large", corpus(150, seed=2, source=2), 1.0),
             MixtureComponent("mid", corpus(60, seed=3, source=3), 2.0)]
    return MixedSource(parts, seq_len, seed, packing)


SOURCES = {
    "concat": lambda: InMemorySource(corpus(), 16, 3, "concat"),
    "whole_documents": lambda: InMemorySource(corpus(loss_mask=True), 48, 3, "whole_documents"),
    "mixture": mixed_source,
}


def run_ranks(source, world: int, steps: int | None, *, workers: int = 0, micro: int = 1, state=None,
              global_batch: int = 6, max_epochs: float | None = None):
    """Per step, every rank's rows in rank order (as simulated ranks in one process); and the
    cursor afterwards. ``steps=None`` runs to the end of the data."""
    loaders = [GlobalBatchLoader(source, global_batch_size=global_batch, micro_batch_size=micro, rank=r,
                                 world_size=world, num_workers=workers, prefetch_steps=3, max_epochs=max_epochs)
               for r in range(world)]
    for loader in loaders:
        if state is not None:
            loader.load_state_dict(state)
    out = []
    try:
        while steps is None or len(out) < steps:
            per_rank = [loader.next_step() for loader in loaders]
            if per_rank[0] is None:
                assert all(p is None for p in per_rank)
                break
            out.append([tuple(row) for mbs in per_rank for mb in mbs for row in mb["input_ids"].tolist()])
        return out, loaders[0].state_dict()
    finally:
        for loader in loaders:
            loader.close()


@pytest.mark.parametrize("new_world", [1, 3])
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("kind", sorted(SOURCES))
def test_resume_on_another_world_size_sees_every_sequence_once(kind, workers, new_world):
    source = SOURCES[kind]()
    # Two epochs, stopped mid-epoch 0 and resumed on another world size with other micro-batches.
    reference, _ = run_ranks(source, world=1, steps=None, micro=2, max_epochs=2)
    first, state = run_ranks(source, world=2, steps=3, workers=workers, micro=3)
    assert state == {"epoch": 0, "consumed": 18}
    rest, _ = run_ranks(source, world=new_world, steps=None, workers=workers, state=state, max_epochs=2)
    assert first + rest == reference

    # Over each whole epoch: exactly the epoch's first (steps x batch) sequences, each once.
    done = 0
    for epoch in (0, 1):
        seqs = source.epoch(epoch)
        steps = len(seqs) // 6
        expected = [tuple(seqs[k]["input_ids"].tolist()) for k in range(steps * 6)]
        got = [row for step in reference[done : done + steps] for row in step]
        assert got == expected
        if kind != "mixture":  # an up-weighted source repeats by design (test_mixture_... checks passes)
            assert len(set(got)) == len(got), "a sequence was repeated within an epoch"
        done += steps
    assert done == len(reference)


def test_whole_documents_never_split_a_prompt_from_its_response():
    seq_len = 24  # shorter than some documents: truncation and dropping are exercised too
    c = corpus(200, seed=5, max_len=40, loss_mask=True)
    epoch = WholeDocumentEpoch(c, seq_len, seed=3, epoch=0)
    seen: dict[int, int] = {}
    targets = 0
    for k in range(len(epoch)):
        s = epoch[k]
        ids, labels, pos = s["input_ids"], s["labels"], s["position_ids"]
        real = ids != 0
        _, doc, within = where(ids[real])
        for d in np.unique(doc):
            assert d not in seen, f"document {d} is in sequences {seen[d]} and {k}"
            seen[d] = k
            part = within[doc == d]
            # Whole from its first token: a prompt is never without the start of its response.
            assert np.array_equal(part, np.arange(len(part)))
            assert len(part) == min(int(c.doc_lengths[d]), seq_len)
        assert np.array_equal(pos[real], within), "position_ids must count from each document's start"
        pad = np.flatnonzero(~real)
        assert np.all(labels[pad] == IGNORE_INDEX)
        # Padding is a segment of its own (positions restart at 0), so no document attends to it.
        assert np.array_equal(pos[pad], np.arange(len(pad)))
        if len(pad):
            assert pad[0] == real.sum() and real[: pad[0]].all(), "padding sits after the documents"
        targets += int((labels[1:] != IGNORE_INDEX).sum())

    # Accounting, computed here independently of the packer: every kept document's targets in its
    # first seq_len tokens are trained; the rest is exactly what the stats report as lost.
    kept_targets = lost = lost_docs = truncated_docs = 0
    for d in range(c.num_documents):
        start, length, prompt = int(c.doc_offsets[d]), int(c.doc_lengths[d]), int(c.prompt_lengths[d])
        is_target = np.zeros(length, dtype=bool)
        is_target[max(prompt, 1):] = True
        is_target &= c.loss_mask[start : start + length] == 1
        fits = int(is_target[:seq_len].sum())
        if length > seq_len and fits == 0:
            lost_docs += 1
            assert d not in seen
        else:
            assert d in seen, f"document {d} was lost"
            truncated_docs += length > seq_len
        kept_targets += fits if (length <= seq_len or fits) else 0
        lost += int(is_target.sum()) - (fits if (length <= seq_len or fits) else 0)
    stats = epoch.stats()
    assert targets == kept_targets
    assert stats["truncated_targets"] + stats["dropped_targets"] == lost > 0
    assert stats["dropped_documents"] == lost_docs > 0
    assert stats["truncated_documents"] == truncated_docs > 0
    assert stats["padding_fraction"] < 0.15

    # The same corpus under ``concat`` does split documents: the property above is not vacuous.
    concat = PackedEpoch(c, seq_len, seed=3, epoch=0)
    assert any(where(concat[k]["input_ids"][:1])[2][0] > 0 for k in range(len(concat)))


def test_whole_document_plan_is_a_pure_function_of_seed_epoch_and_lengths():
    c = corpus(120, seed=7)

    def rows(seed, ep):
        e = WholeDocumentEpoch(c, 32, seed, ep)
        return [e[k]["input_ids"].tolist() for k in range(len(e))]

    assert rows(3, 0) == rows(3, 0)
    assert rows(3, 0) != rows(3, 1) and rows(3, 0) != rows(4, 0)
    # Only the lengths matter to the plan: other token values, same layout.
    shifted = TokenizedCorpus(c.tokens + 5, c.doc_offsets, c.doc_lengths, c.prompt_lengths)
    a, b = WholeDocumentEpoch(c, 32, 3, 0), WholeDocumentEpoch(shifted, 32, 3, 0)
    assert all(np.array_equal(a.documents_of(k), b.documents_of(k)) for k in range(len(a)))


def test_mixture_follows_the_weights_deterministically():
    source = mixed_source()
    e0 = source.epoch(0)
    origin = np.array([where(e0[k]["input_ids"][:1])[0][0] for k in range(len(e0))])
    n = len(origin)
    for s, share in ((1, 0.5), (2, 1 / 6), (3, 1 / 3)):
        assert abs((origin == s).sum() - share * n) <= 1
        # Spread through the epoch, not in blocks: every window of 60 is close to the weights.
        for w in range(0, n - 60, 15):
            assert abs((origin[w : w + 60] == s).sum() - share * 60) <= 2
    # The small source (30 documents, weight 3) is repeated, each pass reshuffled and complete;
    # the large one (weight 1) is subsampled, never repeated within the epoch.
    small = [tuple(e0[k]["input_ids"]) for k in np.flatnonzero(origin == 1)]
    first_pass = len(e0.passes[0][0])
    assert len(e0.passes[0]) > 1
    assert len(set(small[:first_pass])) == first_pass
    assert small[:first_pass] != small[first_pass : 2 * first_pass]
    large = [tuple(e0[k]["input_ids"]) for k in np.flatnonzero(origin == 2)]
    assert len(set(large)) == len(large) < len(e0.passes[1][0])

    again = mixed_source().epoch(0)
    assert all(np.array_equal(e0[k]["input_ids"], again[k]["input_ids"]) for k in range(n))
    e1 = source.epoch(1)
    assert [tuple(e1[k]["input_ids"]) for k in range(20)] != [tuple(e0[k]["input_ids"]) for k in range(20)]

    summary = {row["name"]: row for row in source.summary(0)}
    assert summary["small"]["sequences_per_epoch"] == (origin == 1).sum()
    assert sum(row["sequences_per_epoch"] for row in summary.values()) == n


def test_quotas_split_by_largest_remainder():
    assert quotas(10, [1, 1, 1]).tolist() == [4, 3, 3]
    assert quotas(7, [2, 1, 1]).tolist() == [3, 2, 2]  # 3.5, 1.75, 1.75: the larger remainders win
    with pytest.raises(ValueError, match="> 0"):
        quotas(10, [1, 0])


class FailingSource:
    """Packs normally but raises on one sequence, the way a corrupted shard read would."""

    def __init__(self, bad: int):
        self.inner, self.bad, self.reads = InMemorySource(corpus(), 16, 3), bad, 0

    def epoch(self, epoch):
        parent = self

        class Epoch:
            def __init__(self):
                self.seqs = parent.inner.epoch(epoch)

            def __len__(self):
                return len(self.seqs)

            def __getitem__(self, k):
                parent.reads += 1
                if k == parent.bad:
                    raise OSError(f"unreadable sequence {k}")
                return self.seqs[k]

        return Epoch()


def data_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("shardtune-data")]


def test_worker_exception_surfaces_in_the_loop_with_its_traceback():
    loader = GlobalBatchLoader(FailingSource(bad=14), global_batch_size=6, micro_batch_size=2, rank=0,
                               world_size=1, num_workers=2, prefetch_steps=2)
    assert loader.next_step() is not None and loader.next_step() is not None  # sequences 0..11
    with pytest.raises(OSError, match="unreadable sequence 14") as info:
        loader.next_step()
    text = "".join(traceback.format_exception(info.value))
    assert "in __getitem__" in text and "in build" in text, "the worker's frames are kept"
    assert "raised in data worker thread shardtune-data-r0" in text
    assert loader.state_dict() == {"epoch": 0, "consumed": 12}, "the failed step was not consumed"
    loader.close()
    assert not data_threads(), "workers must exit after a failure"


def test_prefetch_runs_ahead_but_the_state_counts_only_consumed_steps():
    source = FailingSource(bad=-1)
    loader = GlobalBatchLoader(source, global_batch_size=6, micro_batch_size=3, rank=0, world_size=1,
                               num_workers=2, prefetch_steps=3)
    first = loader.next_step()
    pause = threading.Event()
    for _ in range(600):  # wait (bounded, for a loaded machine) for the workers to fill the queue
        if source.reads >= 4 * 6:
            break
        pause.wait(0.1)
    assert source.reads == 4 * 6, "one step consumed plus exactly prefetch_steps=3 built ahead"
    assert loader.state_dict() == {"epoch": 0, "consumed": 6}
    resumed, _ = run_ranks(source.inner, world=1, steps=2, global_batch=6, micro=3, state=loader.state_dict())
    second = loader.next_step()
    assert [tuple(r) for mb in second for r in mb["input_ids"].tolist()] == resumed[0]
    assert first is not None
    loader.close()
    assert not data_threads()


def test_prefetch_workers_stop_at_the_end_of_the_data():
    loader = GlobalBatchLoader(InMemorySource(corpus(), 16, 3), global_batch_size=6, micro_batch_size=1,
                               rank=0, world_size=1, num_workers=2, max_epochs=1)
    steps = 0
    while loader.next_step() is not None:
        steps += 1
    assert steps == loader.steps_per_epoch()
    assert loader.next_step() is None
    for thread in data_threads():
        thread.join(5)
    assert not data_threads()


HANG_GUARD = """
import sys
sys.path[:0] = [{tests!r}, {unit!r}]
from test_data_stream import FailingSource
from shardtune.data.loader import GlobalBatchLoader
loader = GlobalBatchLoader(FailingSource(bad=-1), global_batch_size=6, micro_batch_size=2, rank=0,
                           world_size=1, num_workers=2, prefetch_steps=2)
loader.next_step()
raise RuntimeError("the training loop failed")
"""


def test_a_failing_loop_exits_with_prefetch_workers_running():
    # No close(): the workers are blocked on a full queue when the loop dies, as in a crash.
    proc = subprocess.run([sys.executable, "-c", HANG_GUARD.format(tests=str(ROOT / "tests"), unit=str(ROOT / "tests" / "unit"))], cwd=ROOT,
                          env=run_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "RuntimeError: the training loop failed" in proc.stderr


def segments_start_at_zero(position_ids: np.ndarray) -> bool:
    """Every document piece in the row starts at position 0: no sequence continues a document."""
    pos = np.asarray(position_ids)
    continues = pos[1:] == pos[:-1] + 1
    return pos[0] == 0 and bool(np.all(continues | (pos[1:] == 0)))


def test_prepared_and_jsonl_datasets_mix_with_whole_documents(tmp_path):
    rng = random.Random(0)
    words = "red green blue one two three four five six seven eight nine".split()

    def say(n):
        return " ".join(rng.choices(words, k=n))

    tokenizer = train_tokenizer([say(30) for _ in range(100)] + ["<|user|> <|assistant|>"], 300, tmp_path / "tok")
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": say(rng.randint(3, 12))}, {"role": "assistant", "content": say(rng.randint(3, 20))},
        {"role": "user", "content": say(rng.randint(3, 8))}, {"role": "assistant", "content": say(rng.randint(3, 20))},
    ]}) + "\n" for _ in range(90)))
    ratios = {"train": 0.9, "validation": 0.1, "test": 0.0}
    prepared = prepare_dataset(PrepareSection(progress=False, splits=ratios), tmp_path / "prep",
                               inputs=[str(chat)], tokenizer=tokenizer).out_dir
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": say(6), "completion": say(rng.randint(2, 9))}) + "\n"
                             for _ in range(120)))

    train, _ = build_sources(DataSection(source="prepared", prepared_dir=str(prepared), seq_len=48,
                                         packing="whole_documents"), tokenizer, seed=3)
    epoch = train.epoch(0)
    assert isinstance(epoch, WholeDocumentEpoch) and train.manifest["splits"]["train"]["documents"] > 0
    assert all(segments_start_at_zero(epoch[k]["position_ids"]) for k in range(len(epoch)))

    cfg = load_config(TINY, [f"data.mixture=[{{prepared_dir: {prepared}, name: chat, weight: 1}}, "
                             f"{{path: {pairs}, weight: 2}}]", "data.packing=whole_documents", "data.seq_len=48"])
    data = build_datasets(cfg, tokenizer)
    shares = {row["name"]: row["share"] for row in data.summary["mixture"]}
    assert shares == {"chat": pytest.approx(1 / 3, abs=0.01), "pairs.jsonl": pytest.approx(2 / 3, abs=0.01)}
    for source in (data.train, data.validation):
        e = source.epoch(0)
        assert len(e) > 0
        assert all(segments_start_at_zero(e[k]["position_ids"]) for k in range(len(e)))


MIXTURE_YAML = "model:\n  config:\n    model_type: llama\ndata:\n  mixture:\n{entries}"


@pytest.mark.parametrize("entries, message", [
    ("    - {path: a.jsonl, weight: 0}\n", "'data.mixture.0.weight': Input should be greater than 0"),
    ("    - {path: a.jsonl, weight: 1}\n    - {path: b.jsonl, weight: -2}\n", "'data.mixture.1.weight'"),
    ("    - {path: a.jsonl}\n", "missing required key 'data.mixture.0.weight'"),
    ("    - {path: a.jsonl, prepared_dir: p, weight: 1}\n", "'data.mixture.0': Value error, set exactly one of"),
    ("    []\n", "data.mixture needs at least one source"),
    ("    - {path: x/a.jsonl, weight: 1}\n    - {path: y/a.jsonl, weight: 1}\n", "names must be unique"),
    ("    - {path: a.jsonl, weight: 1}\n  source: jsonl\n  path: b.jsonl\n", "replaces data.source/path"),
])
def test_mixture_config_errors_name_the_key(tmp_path, entries, message):
    path = tmp_path / "run.yaml"
    path.write_text(MIXTURE_YAML.format(entries=entries))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert message in str(info.value)


