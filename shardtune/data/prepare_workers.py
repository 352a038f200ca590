"""The parallel half of ``data prepare``: parse, normalise and tokenize in worker processes.

What needs the whole input (exact and near de-duplication, label ids, the split, accounting,
writing) stays in the parent, which consumes the workers' chunks in input order; so a run
with ``data.prepare.workers: N`` writes byte-identical shards to a single-process run. The
price is that duplicates are tokenized before the parent drops them.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterable, Iterator
from itertools import islice

import numpy as np

from shardtune.data import preference  # noqa: F401  registers the preference parser in a spawned worker
from shardtune.data.encoder import DocumentEncoder
from shardtune.data.records import BadRecord, Record, RecordRules, parse_record

# Records per task: large enough that a task's tokenizer call is batched, small enough that
# the parent's progress bar moves and the pool's read-ahead stays a few MiB.
CHUNK_RECORDS = 256

Parsed = tuple[str, Record | BadRecord, tuple[np.ndarray, np.ndarray] | None]

_worker: dict = {}


def _init_worker(tokenizer, chat_template: str, rules: RecordRules) -> None:
    _worker["encoder"] = DocumentEncoder(tokenizer, chat_template)
    _worker["rules"] = rules


def parse_or_reject(location: str, raw, rules: RecordRules) -> Record | BadRecord:
    if isinstance(raw, BadRecord):
        return raw
    try:
        return parse_record(raw, location, rules)
    except BadRecord as bad:
        return bad


def _parse_and_encode(chunk: list[tuple[str, object]]) -> list[tuple[str, Record | tuple[str, str], object]]:
    parsed = [(location, parse_or_reject(location, raw, _worker["rules"])) for location, raw in chunk]
    records = [item for _, item in parsed if isinstance(item, Record)]
    encoded = iter(_worker["encoder"].encode(records) if records else ())
    # BadRecord is sent as (reason, detail): exceptions with their own __init__ do not
    # survive pickling reliably.
    return [
        (location, item, next(encoded)) if isinstance(item, Record) else (location, (item.reason, item.detail), None)
        for location, item in parsed
    ]


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def parse_and_encode_in_workers(
    items: Iterable[tuple[str, object]], workers: int, tokenizer, chat_template: str, rules: RecordRules
) -> Iterator[Parsed]:
    """Yield ``(location, Record or BadRecord, encoded or None)`` for every item, in input order."""
    # spawn, not fork: the parent may already run tokenizer and torch thread pools, which a
    # forked child would inherit in an undefined state.
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_init_worker, initargs=(tokenizer, chat_template, rules)) as pool:
        for results in pool.imap(_parse_and_encode, _chunks(items, CHUNK_RECORDS)):
            for location, item, encoded in results:
                if isinstance(item, Record):
                    yield location, item, encoded
                else:
                    yield location, BadRecord(*item), None
