"""Checks of ``data prepare`` that must hold before (or instead of) writing anything.

- Length limits by default, derived from the run's ``seq_len``: a token limit alone cannot
  catch a monster record, because a tokenizer trained on the same file compresses repeated
  text to a handful of tokens.
- ``on_bad_record: error`` fails at the first invalid record, before the inputs are hashed,
  a tokenizer is trained or worker processes start (each of which reads or costs seconds).
- ``format: auto`` refuses a file whose first record it could only read by guessing.
- A run that keeps no record is an error naming what dropped them, not an empty dataset.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from shardtune.config import DataSection, PrepareSection
from shardtune.data.readers import read_raw_records
from shardtune.data.records import BadRecord, RecordRules, check_auto_format, parse_record
from shardtune.errors import DataError

# English BPE averages ~4 characters per token; 32 is eight times that, so a record over
# 32 x seq_len characters cannot be text that fits a sequence (code and numbers included).
CHARS_PER_TOKEN_BOUND = 32
# The floor keeps a short seq_len (24 for the classification demos) from dropping an
# ordinary article the model would merely truncate.
MIN_CHAR_LIMIT = 8192

def default_char_limit(seq_len: int) -> int:
    return max(CHARS_PER_TOKEN_BOUND * seq_len, MIN_CHAR_LIMIT)


def resolve_length_limits(settings: PrepareSection, seq_len: int | None) -> PrepareSection:
    """``auto`` limits as numbers (so the manifest and the fingerprint record what applied)."""
    limit = default_char_limit(seq_len or DataSection.model_fields["seq_len"].default)
    update = {key: limit for key in ("max_chars", "max_message_chars") if getattr(settings, key) == "auto"}
    return settings.model_copy(update=update) if update else settings


def record_rules(settings: PrepareSection) -> RecordRules:
    return RecordRules(
        format=settings.format,
        unicode_form=settings.unicode_form,
        allowed_roles=tuple(settings.allowed_roles),
        label_names=tuple(settings.label_names) if settings.label_names is not None else None,
        max_chars=settings.max_chars,
        max_message_chars=settings.max_message_chars,
    )


def checked_auto_format(items: Iterable, path: Path, rules: RecordRules) -> Iterator:
    """``items`` unchanged, after ``check_auto_format`` on the file's first record."""
    checked = rules.format != "auto"
    for location, raw in items:
        if not checked and isinstance(raw, dict):
            check_auto_format(raw, path)
            checked = True
        yield location, raw


def fail_on_first_invalid(paths: list[Path], settings: PrepareSection, rules: RecordRules,
                          invalid: frozenset[str]) -> None:
    """``on_bad_record: error``: a parse-only pass that raises at the first invalid record.

    Parsing is a small part of a preparation's cost (tokenizing is most of it), so strict mode
    pays it twice to fail within a second instead of after the whole input.
    """
    for path in paths:
        if not isinstance(path, Path):  # other sources (data/hf_source.py) are checked as the pipeline reads them
            continue
        for location, raw in checked_auto_format(read_raw_records(path, settings.file_type), path, rules):
            try:
                if isinstance(raw, BadRecord):
                    raise raw
                parse_record(raw, location, rules)
            except BadRecord as bad:
                if bad.reason in invalid:
                    raise DataError(f"{location}: {bad} (data.prepare.on_bad_record=error)") from None


def nothing_kept_error(report_dropped: dict[str, int], examples: dict[str, list[str]], read: int) -> DataError:
    top = sorted(report_dropped.items(), key=lambda kv: (-kv[1], kv[0]))
    reasons = ", ".join(f"{reason}: {count}" for reason, count in top[:5])
    example = examples.get(top[0][0], [""])[0] if top else ""
    return DataError(f"no record kept of {read} read ({reasons}); e.g. {example}" if read
                     else "no record kept: the inputs hold no records")
