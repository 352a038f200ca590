"""The one rule that puts a record in train, validation or test, for every data path.

A record's split is a pure function of a hash of its normalised content and the ratios in
``data.prepare.splits``: the same record lands in the same split whether it goes through
``shardtune data prepare`` or straight from a JSONL file into a run, on any machine, and appending
records to a dataset never moves the ones already there.
"""

from __future__ import annotations

from shardtune.data.records import content_digest

SPLITS = ("train", "validation", "test")


def split_position(digest: bytes) -> float:
    """Uniform in [0, 1) from the content hash (bytes 8-16: the first 8 also key deduplication)."""
    return int.from_bytes(digest[8:16], "big") / 2**64


def assign_split(digest: bytes, ratios) -> str:
    """[0, train) train, then validation, then test."""
    u = split_position(digest)
    if u < ratios.train:
        return "train"
    return "validation" if u < ratios.train + ratios.validation else "test"


def dict_record_digest(record: dict) -> bytes:
    """The content hash ``data prepare`` computes for the same record read from a file."""
    if "messages" in record:
        return content_digest("chat", {"messages": record["messages"]})
    if "prompt" in record:
        return content_digest("prompt_completion", {"prompt": record["prompt"], "completion": record["completion"]})
    if "label" in record:
        return content_digest("labelled", {"text": record["text"], "label": record["label"]})
    return content_digest("text", {"text": record["text"]})


def split_records(records: list[dict], ratios) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, validation, test) of in-memory records, by ``assign_split``."""
    out: dict[str, list[dict]] = {name: [] for name in SPLITS}
    for record in records:
        out[assign_split(dict_record_digest(record), ratios)].append(record)
    return out["train"], out["validation"], out["test"]
