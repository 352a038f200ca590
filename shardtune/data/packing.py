"""Tokenized documents and the elastic packing plan.

A corpus is four flat arrays (tokens, per-document offsets, lengths and prompt lengths, plus
an optional per-token loss mask),
in memory here or memory-mapped from prepared shards. Packing permutes the documents with
``default_rng([seed, epoch])``, concatenates them, and cuts the stream into ``seq_len``
windows. Sequence ``k`` of an epoch is therefore a pure function of (seed, epoch, document
lengths, seq_len): never of the world size, worker count or per-rank batch split. Each
rank materialises only the windows it is given, touching only the documents inside them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TokenizedCorpus:
    tokens: np.ndarray  # 1-D, all documents back to back
    doc_offsets: np.ndarray  # int64, start of each document in ``tokens``
    doc_lengths: np.ndarray  # int64
    prompt_lengths: np.ndarray  # int64, tokens excluded from the loss at each document's start
    # Optional uint8 per token (1 = training target), aligned with ``tokens``. Multi-turn chat
    # needs it: loss on every assistant turn, none on the user turns between them.
    loss_mask: np.ndarray | None = None

    @classmethod
    def from_documents(cls, docs: list[list[int]], prompt_lengths: list[int], vocab_size: int):
        lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
        offsets = np.zeros(len(docs), dtype=np.int64)
        if len(docs) > 1:
            np.cumsum(lengths[:-1], out=offsets[1:])
        dtype = np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32
        flat = np.fromiter((t for d in docs for t in d), dtype=dtype, count=int(lengths.sum()))
        return cls(flat, offsets, lengths, np.asarray(prompt_lengths, dtype=np.int64))

    @property
    def num_documents(self) -> int:
        return len(self.doc_lengths)

    @property
    def num_tokens(self) -> int:
        return int(self.doc_lengths.sum())


class PackedEpoch:
    """The packed sequences of one epoch; ``seq[k]`` is deterministic for (seed, epoch)."""

    def __init__(self, corpus: TokenizedCorpus, seq_len: int, seed: int, epoch: int):
        self.corpus = corpus
        self.seq_len = seq_len
        self.order = np.random.default_rng([seed, epoch]).permutation(corpus.num_documents)
        self.stream_ends = np.cumsum(corpus.doc_lengths[self.order])
        total = int(self.stream_ends[-1]) if len(self.stream_ends) else 0
        self.num_sequences = total // seq_len  # the partial tail window is dropped

    def __len__(self) -> int:
        return self.num_sequences

    def __getitem__(self, k: int) -> dict[str, np.ndarray]:
        if not 0 <= k < self.num_sequences:
            raise IndexError(f"sequence {k} out of range for an epoch of {self.num_sequences}")
        corpus, seq_len = self.corpus, self.seq_len
        input_ids = np.empty(seq_len, dtype=np.int64)
        labels = np.empty(seq_len, dtype=np.int64)
        position_ids = np.empty(seq_len, dtype=np.int64)
        pos = k * seq_len
        slot = int(np.searchsorted(self.stream_ends, pos, side="right"))
        filled = 0
        while filled < seq_len:
            doc = int(self.order[slot])
            doc_start_in_stream = int(self.stream_ends[slot] - corpus.doc_lengths[doc])
            within = pos + filled - doc_start_in_stream
            take = min(int(corpus.doc_lengths[doc]) - within, seq_len - filled)
            start = int(corpus.doc_offsets[doc]) + within
            chunk = slice(filled, filled + take)
            input_ids[chunk] = corpus.tokens[start : start + take]
            # Positions restart at each document: with use_cache=False, transformers turns
            # per-document position_ids into a block-diagonal causal mask.
            position_ids[chunk] = np.arange(within, within + take)
            labels[chunk] = input_ids[chunk]
            masked = max(0, min(int(corpus.prompt_lengths[doc]), within + take) - within)
            labels[filled : filled + masked] = IGNORE_INDEX
            if corpus.loss_mask is not None:
                labels[chunk][corpus.loss_mask[start : start + take] == 0] = IGNORE_INDEX
            if within == 0:
                # Nothing inside this document predicts its first token.
                labels[filled] = IGNORE_INDEX
            filled += take
            slot += 1
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
