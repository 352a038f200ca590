"""whole_documents plans stored beside the prepared data: a resume reads the plan instead of
re-running first-fit, and a plan that is not this corpus's is never used."""

from __future__ import annotations

import numpy as np
import pytest

from shardtune.data import packing
from shardtune.data.packing import CorpusPacker, PlanCache, TokenizedCorpus, WholeDocumentEpoch


def corpus(n: int = 400, seed: int = 0, max_len: int = 60) -> TokenizedCorpus:
    rng = np.random.default_rng(seed)
    docs = [rng.integers(3, 200, rng.integers(2, max_len)).tolist() for _ in range(n)]
    prompts = [int(rng.integers(1, 3)) for _ in docs]
    return TokenizedCorpus.from_documents(docs, prompts, vocab_size=200)


def same_epoch(a: WholeDocumentEpoch, b: WholeDocumentEpoch) -> None:
    assert len(a) == len(b) and a.stats() == b.stats()
    for name in ("docs", "takes", "starts"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    for k in (0, len(a) // 2, len(a) - 1):
        for key, value in a[k].items():
            assert np.array_equal(value, b[k][key]), (k, key)


def no_first_fit(*args, **kwargs):
    raise AssertionError("first_fit ran: the cached plan was not used")


def test_a_cached_plan_is_the_built_plan_and_skips_first_fit(tmp_path, monkeypatch):
    c = corpus(max_len=50)  # seq_len 40: truncated and dropped documents are in the stats too
    cache = PlanCache(tmp_path / "plans", "ab" * 32)
    built = {(e, key): CorpusPacker(c, 40, 3, "whole_documents", cache).epoch(e, key)
             for e in (0, 1) for key in ((), (1, 0))}
    assert len(list((tmp_path / "plans").glob("*.npy"))) == 4
    monkeypatch.setattr(packing, "first_fit", no_first_fit)
    for (e, key), epoch in built.items():
        cached = CorpusPacker(c, 40, 3, "whole_documents", cache).epoch(e, key)
        same_epoch(cached, epoch)
        same_epoch(cached, WholeDocumentEpoch(c, 40, 3, e, key, plan=epoch.plan_arrays()))
    with pytest.raises(AssertionError, match="first_fit ran"):
        CorpusPacker(c, 40, 4, "whole_documents", cache).epoch(0)  # another seed: not cached


def test_a_plan_of_other_data_or_a_torn_file_is_rebuilt(tmp_path, monkeypatch):
    c = corpus()
    CorpusPacker(c, 64, 3, "whole_documents", PlanCache(tmp_path, "ab" * 32)).epoch(0)
    calls = []
    real = packing.first_fit
    monkeypatch.setattr(packing, "first_fit", lambda *a, **k: calls.append(1) or real(*a, **k))
    reference = WholeDocumentEpoch(c, 64, 3, 0)
    # Re-prepared data: another identity.
    same_epoch(CorpusPacker(c, 64, 3, "whole_documents", PlanCache(tmp_path, "cd" * 32)).epoch(0), reference)
    assert len(calls) == 2  # reference + the rebuild
    # A torn write (cut short) under the right identity.
    (path,) = [p for p in tmp_path.glob("*.npy") if p.stat().st_size > 0][:1]
    for broken in (path.read_bytes()[: path.stat().st_size // 2], b""):
        path.write_bytes(broken)
        same_epoch(CorpusPacker(c, 64, 3, "whole_documents", PlanCache(tmp_path, "cd" * 32)).epoch(0), reference)


def test_an_unwritable_cache_only_costs_the_rebuild(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    c = corpus()
    epoch = CorpusPacker(c, 64, 3, "whole_documents", PlanCache(blocker / "plans", "ab" * 32)).epoch(0)
    same_epoch(epoch, WholeDocumentEpoch(c, 64, 3, 0))
