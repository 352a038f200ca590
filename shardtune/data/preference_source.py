"""Preference pairs for training: prepared pair documents -> padded (chosen, rejected) rows.

A pair document (``data.preference``) is ``prompt + chosen + prompt + rejected`` with the loss
mask 0/1/0/1. Each pair becomes two rows of ``data.seq_len`` tokens, ``prompt + chosen`` and
``prompt + rejected``, padded at the end (a causal model never attends forward, so padding needs
no mask), labels -100 outside the response. A row longer than ``seq_len`` keeps its first
``seq_len`` tokens; a pair whose prompt fills the window is dropped. Both are counted.

Pair ids are positions among the kept pairs of the split: the reference log-prob table is
indexed by them, so it does not depend on the epoch's order, the world size or the step. An
epoch is a permutation of pair ids by (seed, epoch), like classification rows, so the global
data cursor of ``GlobalBatchLoader`` (and its resume at any world size) works unchanged: one
"sequence" of the loader is one pair.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shardtune.data.packing import IGNORE_INDEX, PAD_TOKEN, TokenizedCorpus


class NotPreferenceData(ValueError):
    pass


@dataclass(frozen=True)
class PairLayout:
    offsets: np.ndarray  # start of each pair document in the corpus tokens
    prompt: np.ndarray  # prompt tokens (stored twice, identical)
    chosen: np.ndarray
    rejected: np.ndarray


def pair_layout(corpus: TokenizedCorpus, where: str = "") -> PairLayout:
    """The four runs of every document; raises if a document is not a pair."""
    n = corpus.num_documents
    prompt, chosen, rejected = (np.zeros(n, np.int64) for _ in range(3))
    for d in range(n):
        start, length = int(corpus.doc_offsets[d]), int(corpus.doc_lengths[d])
        mask = np.asarray(corpus.loss_mask[start : start + length]) if corpus.loss_mask is not None else None
        edges = np.flatnonzero(np.diff(mask.astype(np.int8))) + 1 if mask is not None else np.array([])
        if mask is None or len(edges) != 3 or mask[0] != 0:
            raise NotPreferenceData(f"{where}: document {d} is not a preference pair (prompt/chosen/prompt/rejected); "
                                    "prepare the data with data.prepare.format=preference")
        p, c = int(edges[0]), int(edges[1] - edges[0])
        if int(edges[2] - edges[1]) != p:
            raise NotPreferenceData(f"{where}: document {d} holds two different prompts")
        prompt[d], chosen[d], rejected[d] = p, c, length - int(edges[2])
    return PairLayout(np.asarray(corpus.doc_offsets, np.int64), prompt, chosen, rejected)


class PreferenceSource:
    """A ``SequenceSource`` of pairs; ``reference`` is the [pairs, 2] table once computed."""

    def __init__(self, corpus: TokenizedCorpus, seq_len: int, seed: int, *, shuffle: bool = True, where: str = ""):
        self.corpus, self.seq_len, self.seed, self.shuffle = corpus, seq_len, seed, shuffle
        layout = pair_layout(corpus, where)
        keep = layout.prompt < seq_len  # else no response token fits in the window
        self.kept = np.flatnonzero(keep)
        self.layout = layout
        self.reference: np.ndarray | None = None
        longest = layout.prompt + np.maximum(layout.chosen, layout.rejected)
        self.counts = {"documents": len(keep), "pairs": int(keep.sum()), "dropped_pairs": int((~keep).sum()),
                       "truncated_pairs": int(((longest > seq_len) & keep).sum())}

    def __len__(self) -> int:
        return len(self.kept)

    def pair(self, i: int) -> dict[str, np.ndarray]:
        """Pair id ``i``: rows [2, seq_len], labels, real lengths, reference log-probs."""
        lay, doc, seq_len = self.layout, int(self.kept[i]), self.seq_len
        p, c, r = int(lay.prompt[doc]), int(lay.chosen[doc]), int(lay.rejected[doc])
        start = int(lay.offsets[doc])
        rows = (np.asarray(self.corpus.tokens[start : start + p + c]),
                np.asarray(self.corpus.tokens[start + p + c : start + 2 * p + c + r]))
        input_ids = np.full((2, seq_len), PAD_TOKEN, dtype=np.int64)
        labels = np.full((2, seq_len), IGNORE_INDEX, dtype=np.int64)
        lengths = np.zeros(2, dtype=np.int64)
        for k, row in enumerate(rows):
            row = row[:seq_len]
            input_ids[k, : len(row)] = row
            labels[k, p : len(row)] = row[p:]
            lengths[k] = len(row)
        ref = self.reference[i] if self.reference is not None else np.full(2, np.nan)
        return {"input_ids": input_ids, "labels": labels, "lengths": lengths,
                "ref_logps": np.asarray(ref, dtype=np.float64), "pair_id": np.int64(i)}

    def epoch(self, epoch: int) -> PreferenceEpoch:
        n = len(self)
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        return PreferenceEpoch(self, order)

    def pairs(self) -> PreferenceEpoch:
        """Every pair in id order (the reference pass)."""
        return PreferenceEpoch(self, np.arange(len(self)))

    def stats(self) -> dict:
        return dict(self.counts, seq_len=self.seq_len)


class PreferenceEpoch:
    def __init__(self, source: PreferenceSource, order: np.ndarray):
        self.source, self.order = source, order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, k: int) -> dict[str, np.ndarray]:
        return self.source.pair(int(self.order[k]))

    def stats(self) -> dict:
        return self.source.stats()


def preference_datasets(cfg, tokenizer):
    """``task: preference``: the splits of a prepared pair directory (``Datasets`` fields)."""
    from shardtune.data.shards import PreparedSource
    from shardtune.data.tokenizer import tokenizer_fingerprint
    from shardtune.errors import DataError

    data, seed = cfg.data, cfg.run.seed
    if data.source != "prepared" or data.mixture:
        raise DataError("task=preference reads pairs prepared by `shardtune data prepare` with "
                        "data.prepare.format=preference: set data.source=prepared and data.prepared_dir")
    fingerprint = tokenizer_fingerprint(tokenizer)
    splits = {}
    for split in ("train", "validation", "test"):
        prepared = PreparedSource(data.prepared_dir, split, data.seq_len, seed, tokenizer_fingerprint=fingerprint,
                                  verify=data.verify_checksums) if _has(data.prepared_dir, split) else None
        if prepared is not None:
            try:
                splits[split] = PreferenceSource(prepared.corpus, data.seq_len, seed, shuffle=split == "train",
                                                 where=f"{data.prepared_dir}/{split}")
            except NotPreferenceData as exc:
                raise DataError(str(exc)) from None
    if "train" not in splits or not len(splits["train"]):
        raise DataError(f"{data.prepared_dir}: no training pairs fit data.seq_len={data.seq_len}")
    if "validation" not in splits:
        # Rewards on training pairs say nothing about generalisation: refuse rather than mislead.
        raise DataError(f"{data.prepared_dir} has no validation pairs: give data.prepare.splits a validation share")
    from shardtune.data.shards import read_manifest

    # What the reference tables in a checkpoint must belong to: these pairs at this seq_len.
    pairs_fingerprint = f"{read_manifest(data.prepared_dir)['fingerprint']}:seq_len={data.seq_len}"
    summary = {"source": f"prepared preference pairs ({data.prepared_dir})", "fingerprint": pairs_fingerprint,
               "splits": {name: s.stats() for name, s in splits.items()}}
    return {"train": splits["train"], "validation": splits["validation"], "test": splits.get("test"),
            "summary": summary}


def _has(prepared_dir, split: str) -> bool:
    from shardtune.data.shards import read_manifest

    return bool(read_manifest(prepared_dir)["splits"].get(split, {}).get("documents", 0))
