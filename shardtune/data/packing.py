"""Tokenized documents and the elastic packing plans.

A corpus is four flat arrays (tokens, per-document offsets, lengths and prompt lengths, plus
an optional per-token loss mask), in memory here or memory-mapped from prepared shards. Two
packers turn an epoch's document order into fixed-length sequences:

``concat`` (``PackedEpoch``) permutes the documents with ``default_rng([seed, epoch])``,
concatenates them, and cuts the stream into ``seq_len`` windows. No token is padding, but a
window boundary may fall anywhere, between a prompt and its response included.

``whole_documents`` (``WholeDocumentEpoch``) places every document whole into one sequence,
first-fit over the last ``OPEN_SEQUENCES`` sequences still open, in the same permuted order,
and pads the rest (labels ``-100``; padding gets its own position ids so it is a separate
"document" that nothing attends across). A document longer than ``seq_len`` is truncated to
its first ``seq_len`` tokens when a target token fits there, and dropped when its prompt alone
fills the window; both are counted (``TruncationStats``). Truncation rather than splitting:
a split response continued in another sequence trains on text without its prompt, which is
exactly what this packer exists to avoid.

Either way sequence ``k`` of an epoch is a pure function of (seed, epoch, document lengths,
seq_len): never of the world size, worker count or per-rank batch split. Each rank
materialises only the sequences it is given, touching only the documents inside them.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shardtune.integrity import sha256_json

IGNORE_INDEX = -100
PACKINGS = ("concat", "whole_documents")
# First-fit looks back over this many open sequences. A bounded window keeps the plan
# O(documents) and the sequence order close to the document order; 8 already leaves
# little padding for typical SFT length mixes (see tests/test_data_stream.py).
OPEN_SEQUENCES = 8
PAD_TOKEN = 0  # never a target and never attended to by a real document


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

    def target_count(self, doc: int, within: int = 0, take: int | None = None) -> int:
        """Loss tokens in ``doc[within:within+take]``; a document's first token is never one."""
        length = int(self.doc_lengths[doc])
        stop = length if take is None else within + take
        first = max(int(self.prompt_lengths[doc]), within + 1 if within == 0 else within)
        if first >= stop:
            return 0
        if self.loss_mask is None:
            return stop - first
        start = int(self.doc_offsets[doc])
        return int(np.count_nonzero(self.loss_mask[start + first : start + stop]))


def document_order(num_documents: int, seed: int, epoch: int, key: tuple[int, ...] = ()) -> np.ndarray:
    # ``key`` separates streams that share a seed and epoch (the sources of a mixture); empty
    # for a plain source, so its order is the one it always had.
    return np.random.default_rng([seed, epoch, *key]).permutation(num_documents)


def _fill(corpus: TokenizedCorpus, doc: int, within: int, take: int, filled: int,
          input_ids: np.ndarray, labels: np.ndarray, position_ids: np.ndarray) -> None:
    """Copy ``doc[within:within+take]`` to ``[filled:filled+take]`` with its labels and positions."""
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


def _empty(seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (np.empty(seq_len, dtype=np.int64), np.empty(seq_len, dtype=np.int64),
            np.empty(seq_len, dtype=np.int64))


class PackedEpoch:
    """``concat`` packing: the permuted documents back to back, cut into ``seq_len`` windows."""

    def __init__(self, corpus: TokenizedCorpus, seq_len: int, seed: int, epoch: int, key: tuple[int, ...] = ()):
        self.corpus = corpus
        self.seq_len = seq_len
        self.order = document_order(corpus.num_documents, seed, epoch, key)
        self.stream_ends = np.cumsum(corpus.doc_lengths[self.order])
        total = int(self.stream_ends[-1]) if len(self.stream_ends) else 0
        self.num_sequences = total // seq_len  # the partial tail window is dropped

    def __len__(self) -> int:
        return self.num_sequences

    def __getitem__(self, k: int) -> dict[str, np.ndarray]:
        if not 0 <= k < self.num_sequences:
            raise IndexError(f"sequence {k} out of range for an epoch of {self.num_sequences}")
        corpus, seq_len = self.corpus, self.seq_len
        input_ids, labels, position_ids = _empty(seq_len)
        pos = k * seq_len
        slot = int(np.searchsorted(self.stream_ends, pos, side="right"))
        filled = 0
        while filled < seq_len:
            doc = int(self.order[slot])
            doc_start_in_stream = int(self.stream_ends[slot] - corpus.doc_lengths[doc])
            within = pos + filled - doc_start_in_stream
            take = min(int(corpus.doc_lengths[doc]) - within, seq_len - filled)
            _fill(corpus, doc, within, take, filled, input_ids, labels, position_ids)
            filled += take
            slot += 1
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}

    def stats(self) -> dict:
        return {"packing": "concat", "sequences": self.num_sequences,
                "dropped_tail_tokens": int(self.stream_ends[-1]) - self.num_sequences * self.seq_len
                if len(self.stream_ends) else 0}


@dataclass(frozen=True)
class TruncationStats:
    """What ``whole_documents`` packing cannot place whole; independent of the epoch's order."""

    truncated_documents: int
    truncated_tokens: int  # tokens cut off the end of truncated documents
    truncated_targets: int  # loss tokens among them
    dropped_documents: int  # over-long documents whose prompt leaves no target in ``seq_len``
    dropped_tokens: int
    dropped_targets: int

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def truncation_plan(corpus: TokenizedCorpus, seq_len: int) -> tuple[np.ndarray, TruncationStats]:
    """Per document, the tokens ``whole_documents`` packing keeps (0 = dropped), and the counts."""
    lengths = np.asarray(corpus.doc_lengths, dtype=np.int64)
    keep = np.minimum(lengths, seq_len)
    over = np.flatnonzero(lengths > seq_len)
    truncated = [0, 0, 0]
    dropped = [0, 0, 0]
    for doc in over.tolist():
        kept_targets = corpus.target_count(doc, 0, seq_len)
        all_targets = corpus.target_count(doc)
        if kept_targets == 0:
            keep[doc] = 0
            dropped[0] += 1
            dropped[1] += int(lengths[doc])
            dropped[2] += all_targets
        else:
            truncated[0] += 1
            truncated[1] += int(lengths[doc]) - seq_len
            truncated[2] += all_targets - kept_targets
    return keep, TruncationStats(*truncated, *dropped)


def first_fit(lengths: list[int], seq_len: int, window: int = OPEN_SEQUENCES) -> np.ndarray:
    """The sequence index of each item, placing items in order into the first open sequence
    with room, among the ``window`` most recently opened; a full or evicted one is closed."""
    assignment: list[int] = []  # a list: item writes into numpy cost more than the whole search
    free: list[int] = []  # room left in each open sequence, oldest first
    ids: list[int] = []
    opened = 0
    for length in lengths:
        for j, room in enumerate(free):
            if length <= room:
                assignment.append(ids[j])
                if room == length:
                    del free[j], ids[j]
                else:
                    free[j] = room - length
                break
        else:
            assignment.append(opened)
            if length < seq_len:
                if len(free) == window:
                    del free[0], ids[0]
                free.append(seq_len - length)
                ids.append(opened)
            opened += 1
    return np.asarray(assignment, dtype=np.int64)


class WholeDocumentEpoch:
    """``whole_documents`` packing: no document is split between two sequences."""

    def __init__(self, corpus: TokenizedCorpus, seq_len: int, seed: int, epoch: int, key: tuple[int, ...] = (),
                 truncation: tuple[np.ndarray, TruncationStats] | None = None, *, plan: dict | None = None):
        """``plan``: the arrays of ``plan_arrays()`` from an earlier build of this same epoch."""
        self.corpus = corpus
        self.seq_len = seq_len
        if plan is not None:
            self.docs, self.takes, self.starts = plan["docs"], plan["takes"], plan["starts"]
            self.truncation = TruncationStats(*(int(v) for v in plan["truncation"]))
            self.num_sequences = len(self.starts) - 1
            return
        keep, self.truncation = truncation or truncation_plan(corpus, seq_len)
        order = document_order(corpus.num_documents, seed, epoch, key)
        order = order[keep[order] > 0]
        assignment = first_fit(keep[order].tolist(), seq_len)
        # Group the placed documents by sequence, keeping placement order inside each.
        by_sequence = np.argsort(assignment, kind="stable")
        self.docs = order[by_sequence]
        self.takes = keep[self.docs]
        self.num_sequences = int(assignment.max()) + 1 if len(assignment) else 0
        self.starts = np.searchsorted(assignment[by_sequence], np.arange(self.num_sequences + 1))

    def plan_arrays(self) -> dict[str, np.ndarray]:
        return {"docs": self.docs, "takes": self.takes, "starts": self.starts,
                "truncation": np.asarray(list(self.truncation.as_dict().values()), dtype=np.int64)}

    def __len__(self) -> int:
        return self.num_sequences

    def __getitem__(self, k: int) -> dict[str, np.ndarray]:
        if not 0 <= k < self.num_sequences:
            raise IndexError(f"sequence {k} out of range for an epoch of {self.num_sequences}")
        input_ids, labels, position_ids = _empty(self.seq_len)
        filled = 0
        for slot in range(int(self.starts[k]), int(self.starts[k + 1])):
            take = int(self.takes[slot])
            _fill(self.corpus, int(self.docs[slot]), 0, take, filled, input_ids, labels, position_ids)
            filled += take
        pad = self.seq_len - filled
        input_ids[filled:] = PAD_TOKEN
        labels[filled:] = IGNORE_INDEX
        position_ids[filled:] = np.arange(pad)
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}

    def documents_of(self, k: int) -> np.ndarray:
        return self.docs[self.starts[k] : self.starts[k + 1]]

    def stats(self) -> dict:
        used = int(self.takes.sum())
        capacity = self.num_sequences * self.seq_len
        return {"packing": "whole_documents", "sequences": self.num_sequences,
                "padding_tokens": capacity - used, "padding_fraction": round(1 - used / max(capacity, 1), 4),
                **self.truncation.as_dict()}


class PlanCache:
    """Built ``whole_documents`` plans on disk, one file per (seq_len, seed, epoch, key).

    The first-fit pass is sequential Python over every document (1.1-1.4 s at 1.5M
    documents), and a run rebuilds its epoch's plan at every start and resume. A plan is a
    pure function of (corpus, seq_len, seed, epoch, key), so it is stored once beside the
    prepared data under the corpus's ``identity`` (a digest of its manifest entry) and read
    back memory-mapped. A cache that cannot be written (a read-only dataset) only costs the
    rebuild; a file from another corpus, packer version or a torn write is never used.
    """

    VERSION = 1

    def __init__(self, directory: str | Path, identity: str):
        self.directory = Path(directory)
        self.identity = identity

    def _path(self, seq_len: int, seed: int, epoch: int, key: tuple[int, ...]) -> Path:
        suffix = "".join(f"-k{k}" for k in key)
        return self.directory / f"whole-v{self.VERSION}-w{OPEN_SEQUENCES}-L{seq_len}-s{seed}-e{epoch}{suffix}.npy"

    def load(self, seq_len: int, seed: int, epoch: int, key: tuple[int, ...]) -> dict[str, np.ndarray] | None:
        path = self._path(seq_len, seed, epoch, key)
        try:
            flat = np.load(path, mmap_mode="r")
        except (OSError, ValueError, EOFError):  # absent, or torn by a crash mid-write elsewhere
            return None
        return _unpack_plan(flat, self.identity)

    def store(self, seq_len: int, seed: int, epoch: int, key: tuple[int, ...], plan: dict[str, np.ndarray]) -> None:
        path = self._path(seq_len, seed, epoch, key)
        # Ranks may build the same plan at once: each writes its own file, and the rename
        # makes one complete copy visible (the copies are identical).
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with tmp.open("wb") as fh:
                np.save(fh, _pack_plan(plan, self.identity))
            os.replace(tmp, path)
        except OSError:  # read-only or missing: the plan is rebuilt next time
            try:
                tmp.unlink()
            except OSError:
                pass


def plan_cache_beside(prepared_dir: str | Path, split: str, split_manifest: dict) -> PlanCache:
    """``<prepared_dir>/plans/<split>/``, keyed by the split's manifest entry (every shard's
    sha256): re-preparing the data changes the identity, so old plans are never used."""
    return PlanCache(Path(prepared_dir) / "plans" / split, sha256_json(split_manifest))


def _identity_words(identity: str) -> np.ndarray:
    return np.frombuffer(bytes.fromhex(identity[:32].ljust(32, "0")), dtype=np.int64)


def _pack_plan(plan: dict[str, np.ndarray], identity: str) -> np.ndarray:
    """One int64 array: identity (2), counts (3), truncation (6), then docs, takes, starts."""
    docs, takes, starts = (np.asarray(plan[k], dtype=np.int64) for k in ("docs", "takes", "starts"))
    header = np.concatenate([_identity_words(identity), [len(docs), len(takes), len(starts)],
                             np.asarray(plan["truncation"], dtype=np.int64)])
    return np.concatenate([header, docs, takes, starts])


def _unpack_plan(flat: np.ndarray, identity: str) -> dict[str, np.ndarray] | None:
    header = 11
    if flat.ndim != 1 or len(flat) < header or not np.array_equal(flat[:2], _identity_words(identity)):
        return None
    n_docs, n_takes, n_starts = (int(v) for v in flat[2:5])
    if n_docs != n_takes or n_starts < 1 or len(flat) != header + n_docs + n_takes + n_starts:
        return None
    body = flat[header:]
    return {"docs": body[:n_docs], "takes": body[n_docs : 2 * n_docs],
            "starts": body[2 * n_docs :], "truncation": np.asarray(flat[5:header])}


class CorpusPacker:
    """Packs one corpus with the configured packer; caches the order-independent truncation
    and, given a ``plan_cache``, every built ``whole_documents`` plan."""

    def __init__(self, corpus: TokenizedCorpus, seq_len: int, seed: int, packing: str = "concat",
                 plan_cache: PlanCache | None = None):
        if packing not in PACKINGS:
            raise ValueError(f"data.packing={packing!r} is not one of {', '.join(PACKINGS)}")
        self.corpus, self.seq_len, self.seed, self.packing = corpus, seq_len, seed, packing
        self.plan_cache = plan_cache
        self._truncation = None

    def epoch(self, epoch: int, key: tuple[int, ...] = ()) -> PackedEpoch | WholeDocumentEpoch:
        if self.packing == "concat":
            return PackedEpoch(self.corpus, self.seq_len, self.seed, epoch, key)
        args = (self.seq_len, self.seed, epoch, key)
        if self.plan_cache is not None:
            plan = self.plan_cache.load(*args)
            if plan is not None and _plan_fits(plan, self.corpus.num_documents):
                return WholeDocumentEpoch(self.corpus, self.seq_len, self.seed, epoch, key, plan=plan)
        if self._truncation is None:
            self._truncation = truncation_plan(self.corpus, self.seq_len)
        built = WholeDocumentEpoch(self.corpus, self.seq_len, self.seed, epoch, key, self._truncation)
        if self.plan_cache is not None:
            self.plan_cache.store(*args, built.plan_arrays())
        return built


def _plan_fits(plan: dict[str, np.ndarray], num_documents: int) -> bool:
    # Cheap sanity beyond the identity: a plan never names a document the corpus lacks.
    docs = plan["docs"]
    return len(docs) == 0 or (int(plan["starts"][-1]) == len(docs) and int(docs.max()) < num_documents)
