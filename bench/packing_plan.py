"""Resume cost of ``whole_documents`` packing at 1.5M documents: the epoch plan built by
first-fit (what every start and resume paid before) vs read back from the plan cache.

    .venv/bin/python bench/packing_plan.py [--documents 1500000]

Times the packer's ``epoch(e)`` plus materialising one global batch of sequences, which is
what a resuming loader does before its first step. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import numpy as np

from shardtune.data.packing import CorpusPacker, PlanCache, TokenizedCorpus


def synthetic_corpus(n: int, seed: int = 0) -> TokenizedCorpus:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(40, 600, n).astype(np.int64)  # chat turns: a ~15x spread
    offsets = np.zeros(n, np.int64)
    np.cumsum(lengths[:-1], out=offsets[1:])
    tokens = rng.integers(3, 30000, int(lengths.sum())).astype(np.uint16)
    return TokenizedCorpus(tokens, offsets, lengths, np.full(n, 12, np.int64))


def resume(corpus, cache, epoch: int, batch: int = 64) -> float:
    start = time.perf_counter()
    seqs = CorpusPacker(corpus, 2048, 7, "whole_documents", cache).epoch(epoch)
    for k in range(len(seqs) // 2, len(seqs) // 2 + batch):  # mid-epoch cursor
        seqs[k]
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--documents", type=int, default=1_500_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    corpus = synthetic_corpus(args.documents)
    with tempfile.TemporaryDirectory() as tmp:
        uncached = [resume(corpus, None, 1) for _ in range(args.repeats)]
        cache = PlanCache(tmp, "ab" * 32)
        first = resume(corpus, cache, 1)  # builds and stores
        cached = [resume(corpus, cache, 1) for _ in range(args.repeats)]
    print(json.dumps({
        "documents": args.documents, "cpus": os.cpu_count(), "load_1min": os.getloadavg()[0],
        "uncached_ms": round(1000 * statistics.median(uncached)), "first_build_and_store_ms": round(1000 * first),
        "cached_ms": round(1000 * statistics.median(cached), 1),
    }))


if __name__ == "__main__":
    main()
