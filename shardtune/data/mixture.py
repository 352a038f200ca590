"""Several datasets mixed by weight into one sequence order, deterministically.

Each source packs its own documents (``concat`` or ``whole_documents``). An epoch of the
mixture has as many sequences as the sources' first passes together, ``N``; source ``s`` gets
``c_s`` of them, ``N * w_s / sum(w)`` rounded by largest remainder. A source asked for more
than one pass holds (an up-weighted small source) continues with a fresh pass, reshuffled;
one asked for fewer (a down-weighted large source) contributes the first ``c_s`` sequences of
its shuffled pass, so which ones changes every epoch. The ``c_s`` slots of each source are
spread evenly over the epoch (source ``s``'s ``j``-th sequence sits at time
``(j + 0.5) / c_s``; ties go to the lower source index), so every window of the order holds
the sources close to their weights.

Everything is a pure function of (seed, epoch, weights, document lengths, seq_len): pass
``r`` of source ``s`` in mixture epoch ``e`` is ordered by ``default_rng([seed, e, s, r])``.
The loader's cursor (epoch, sequences consumed) stays the whole resume state.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shardtune.data.packing import CorpusPacker, TokenizedCorpus


@dataclass(frozen=True)
class MixtureComponent:
    name: str
    corpus: TokenizedCorpus
    weight: float


def quotas(total: int, weights: list[float]) -> np.ndarray:
    """``total`` split in proportion to ``weights``, by largest remainder (ties: lower index)."""
    w = np.asarray(weights, dtype=np.float64)
    if len(w) == 0 or not np.all(w > 0) or not np.all(np.isfinite(w)):
        raise ValueError(f"mixture weights must be finite and > 0 (got {list(weights)})")
    exact = total * w / w.sum()
    counts = np.floor(exact).astype(np.int64)
    short = total - int(counts.sum())
    if short > 0:
        counts[np.argsort(-(exact - counts), kind="stable")[:short]] += 1
    return counts


def interleave(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(source, index within source) of each slot, every source's slots spread evenly."""
    times = np.concatenate([(np.arange(c) + 0.5) / c for c in counts.tolist() if c > 0] or [np.zeros(0)])
    sources = np.repeat(np.arange(len(counts)), counts)
    within = np.concatenate([np.arange(c) for c in counts.tolist()] or [np.zeros(0, np.int64)])
    order = np.argsort(times, kind="stable")
    return sources[order].astype(np.int32), within[order].astype(np.int64)


class MixedEpoch:
    def __init__(self, packers: list[CorpusPacker], weights: list[float], epoch: int):
        firsts = [p.epoch(epoch, key=(s, 0)) for s, p in enumerate(packers)]
        self.num_sequences = sum(len(f) for f in firsts)
        self.counts = quotas(self.num_sequences, weights)
        self.sources, self.within = interleave(self.counts)
        # Every pass a source needs this epoch, built now: cheap, and read-only afterwards,
        # so prefetch threads can index concurrently.
        self.passes: list[list] = []
        self.pass_starts: list[np.ndarray] = []
        for s, (packer, first) in enumerate(zip(packers, firsts, strict=True)):
            passes, total = [first], len(first)
            if total == 0 and self.counts[s] > 0:
                raise ValueError(f"mixture source {s} packs into no sequence of seq_len {packer.seq_len}")
            while total < self.counts[s]:
                passes.append(packer.epoch(epoch, key=(s, len(passes))))
                total += len(passes[-1])
            self.passes.append(passes)
            self.pass_starts.append(np.cumsum([0] + [len(p) for p in passes]))

    def __len__(self) -> int:
        return self.num_sequences

    def locate(self, k: int) -> tuple[int, int, int]:
        """(source, pass, index in pass) of mixed sequence ``k``."""
        if not 0 <= k < self.num_sequences:
            raise IndexError(f"sequence {k} out of range for an epoch of {self.num_sequences}")
        s, j = int(self.sources[k]), int(self.within[k])
        r = int(np.searchsorted(self.pass_starts[s], j, side="right")) - 1
        return s, r, j - int(self.pass_starts[s][r])

    def __getitem__(self, k: int) -> dict[str, np.ndarray]:
        s, r, i = self.locate(k)
        return self.passes[s][r][i]

    def passes_used(self) -> list[float]:
        return [round(int(c) / max(len(p[0]), 1), 4) for c, p in zip(self.counts, self.passes, strict=True)]


class MixedSource:
    """A ``SequenceSource`` over weighted components."""

    def __init__(self, components: list[MixtureComponent], seq_len: int, seed: int, packing: str = "concat"):
        if not components:
            raise ValueError("data.mixture needs at least one source")
        quotas(1, [c.weight for c in components])  # validates the weights
        self.components = components
        self.seq_len = seq_len
        self.packers = [CorpusPacker(c.corpus, seq_len, seed, packing) for c in components]

    def epoch(self, epoch: int) -> MixedEpoch:
        return MixedEpoch(self.packers, [c.weight for c in self.components], epoch)

    def summary(self, epoch: int = 0) -> list[dict]:
        """Per source: documents, and how many of an epoch's sequences it supplies."""
        mixed = self.epoch(epoch)
        total = max(len(mixed), 1)
        weight_sum = sum(c.weight for c in self.components)
        return [
            {"name": c.name, "weight": c.weight, "target_share": round(c.weight / weight_sum, 4),
             "documents": c.corpus.num_documents, "sequences_per_epoch": int(mixed.counts[s]),
             "share": round(int(mixed.counts[s]) / total, 4), "passes_per_epoch": mixed.passes_used()[s],
             "packing": mixed.passes[s][0].stats()}
            for s, c in enumerate(self.components)
        ]
