"""What ``data.seq_len`` and ``eval.generate.max_new_tokens`` cut from the evaluated splits.

Demo-sized defaults (``seq_len`` 128, ``max_new_tokens`` 8) give exact match 0 on answers
longer than that without a word: an answer of 12 tokens can never be generated in 8. The
counts are logged to metrics.jsonl (kind ``truncation``) and printed as warnings on rank 0,
and the run report shows them.
"""

from __future__ import annotations

import numpy as np


def documents_over(source, seq_len: int) -> tuple[int, int] | None:
    """(documents, how many are longer than ``seq_len``) of a split, or None if unknown."""
    corpus = getattr(source, "corpus", None)
    if corpus is not None:
        lengths = np.asarray(corpus.doc_lengths)
        return int(len(lengths)), int((lengths > seq_len).sum())
    examples = getattr(source, "examples", None)
    if examples is not None:  # padded classification rows: a full last column was (likely) cut
        mask = np.asarray(examples.attention_mask)
        return int(len(mask)), int((mask[:, -1] == 1).sum())
    return None


def answer_tokens(answer: list[int], eos_ids: set[int]) -> int:
    """Tokens a generation must produce to match ``answer`` (everything before its EOS)."""
    for i, token in enumerate(answer):
        if token in eos_ids:
            return i
    return len(answer)


def truncation_record(split: str, source, seq_len: int, samples, max_new_tokens: int,
                      eos_ids: set[int]) -> dict | None:
    """The scalars of one split's truncation (None when nothing is cut)."""
    record: dict = {}
    docs = documents_over(source, seq_len)
    if docs and docs[1]:
        record.update(documents=docs[0], documents_over_seq_len=docs[1], seq_len=seq_len)
    if samples:
        over = sum(answer_tokens(s.answer, eos_ids) > max_new_tokens for s in samples)
        if over:
            record.update(samples=len(samples), answers_over_max_new_tokens=int(over), max_new_tokens=max_new_tokens)
    return record or None


def warning_lines(split: str, record: dict) -> list[str]:
    lines = []
    if record.get("documents_over_seq_len"):
        lines.append(f"{record['documents_over_seq_len']} of {record['documents']} {split} documents are longer "
                     f"than data.seq_len={record['seq_len']} (cut; their metrics see part of them)")
    if record.get("answers_over_max_new_tokens"):
        lines.append(f"{record['answers_over_max_new_tokens']} of {record['samples']} sampled {split} answers are "
                     f"longer than eval.generate.max_new_tokens={record['max_new_tokens']}: they can never match "
                     "exactly; raise eval.generate.max_new_tokens")
    return lines
