"""Raw objects into validated, normalised records, and removing duplicates.

Every raw record (data/readers.py reads them from files) either becomes a ``Record`` or a
``BadRecord`` carrying a drop reason and its ``file:line`` (``file:row`` for Parquet), so the
preparation report can account for each one. Nothing here tokenizes.

Normalisation (``clean_text``), chosen to be safe for prose *and* code:
- Unicode NFC by default: canonical composition only, so nothing changes meaning. NFKC is
  available (``unicode_form: NFKC``) but folds compatibility characters (full-width forms,
  superscripts, ligatures), which alters maths and some scripts.
- CRLF/CR -> LF, Unicode space separators -> ' ', control characters except tab and newline
  dropped, zero-width space and BOM dropped.
- Trailing whitespace stripped per line, three or more newlines collapsed to two, the whole
  field stripped. Runs of spaces inside a line are kept: they are indentation in code.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from shardtune.errors import DataError

FORMATS = ("chat", "prompt_completion", "text", "labelled", "preference")
# Formats parsed by a module built on this one, which registers its parser when imported
# (data/preference.py: "preference"), so this module never imports it back.
PARSERS: dict[str, Any] = {}


class BadRecord(Exception):
    """A raw record that cannot be used; ``reason`` is the short key counted in the report."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def content_digest(kind: str, content: dict[str, Any]) -> bytes:
    canonical = json.dumps([kind, content], ensure_ascii=False, sort_keys=True)
    return hashlib.blake2b(canonical.encode("utf-8"), digest_size=16).digest()


@dataclass
class Record:
    kind: str  # one of FORMATS
    location: str  # file:line of the raw record
    messages: list[dict[str, str]] = field(default_factory=list)
    prompt: str = ""
    completion: str = ""
    text: str = ""
    label: str | None = None

    def content(self) -> dict[str, Any]:
        if self.kind == "chat":
            return {"messages": self.messages}
        if self.kind == "prompt_completion":
            return {"prompt": self.prompt, "completion": self.completion}
        if self.kind == "labelled":
            return {"text": self.text, "label": self.label}
        return {"text": self.text}

    def content_digest(self) -> bytes:
        """Hash of the normalised content: the split key (``data/splits.py``)."""
        return content_digest(self.kind, self.content())

    def num_chars(self) -> int:
        if self.kind == "chat":
            return sum(len(m["content"]) for m in self.messages)
        return len(self.plain_text())

    def dedup_key(self) -> bytes:
        """The exact-duplicate key: content after ``loose_text`` (case, spacing, a final full stop).

        Looser than ``content_digest`` (which decides the split and must not change), yet it
        keeps every character that can carry meaning inside the text: ``libfoo-dev`` and
        ``libfoo++-dev`` stay different records. Labels and roles are compared as they are.
        """
        if self.kind not in ("chat", "prompt_completion", "text", "labelled"):
            return self.content_digest()  # formats defined elsewhere keep their own key
        content = _loosened(self.content())
        canonical = json.dumps([self.kind, content], ensure_ascii=False, sort_keys=True)
        return hashlib.blake2b(canonical.encode("utf-8"), digest_size=16).digest()

    def plain_text(self) -> str:
        """All content as one string, for near-duplicate detection."""
        if self.kind == "chat":
            return "\n".join(m["content"] for m in self.messages)
        if self.kind == "prompt_completion":
            return self.prompt + "\n" + self.completion
        return self.text


# --------------------------------------------------------------------------------------
# Validation and normalisation: raw object -> Record, or BadRecord


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u200b\ufeff]")
_SPACE_SEPARATORS = re.compile(r"[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_TRAILING = re.compile(r"[ \t]+\n")
_MANY_NEWLINES = re.compile(r"\n{3,}")


def clean_text(text: str, unicode_form: str = "NFC") -> str:
    text = unicodedata.normalize(unicode_form, text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = _SPACE_SEPARATORS.sub(" ", text)
    text = _TRAILING.sub("\n", text)
    text = _MANY_NEWLINES.sub("\n\n", text)
    return text.strip()


@dataclass(frozen=True)
class RecordRules:
    format: str = "auto"
    unicode_form: str = "NFC"
    allowed_roles: tuple[str, ...] = ("system", "user", "assistant", "tool")
    label_names: tuple[str, ...] | None = None
    # Characters after normalisation; None = no limit. A token limit alone cannot catch a
    # monster record: a tokenizer trained on the same file compresses repeated text to a
    # handful of tokens.
    max_chars: int | None = None
    max_message_chars: int | None = None


def detect_format(obj: dict[str, Any]) -> str:
    if any(k in obj for k in ("chosen", "preferred_output", "rating")):  # before "messages": pairs have them too
        return "preference"
    if "messages" in obj:
        return "chat"
    if "prompt" in obj or "completion" in obj:
        return "prompt_completion"
    if "label" in obj:
        return "labelled"
    if "text" in obj:
        return "text"
    raise BadRecord("missing_field", f"no 'messages', 'prompt'/'completion' or 'text' among {sorted(obj)}")


def check_auto_format(obj: dict[str, Any], path: Path) -> None:
    """``format: auto`` on a file's first record: refuse to guess plain text from a table with more columns.

    A CSV of ``text,category`` would otherwise become unlabelled text without a word. Chat,
    prompt/completion and labelled records name their fields; only "text" plus unknown
    columns is a guess.
    """
    try:
        kind = detect_format(obj)
    except BadRecord:
        return  # counted (or refused) as missing_field record by record
    others = sorted(set(obj) - {"text"})
    if kind == "text" and others:
        raise DataError(
            f"{path}: data.prepare.format=auto cannot tell what this file holds: its columns are "
            f"{sorted(obj)}. Plain text uses 'text' alone; for classification name the label column "
            f"'label'; or set data.prepare.format (text, to ignore {others})"
        )


def _string_field(obj: dict[str, Any], name: str, rules: RecordRules) -> str:
    if name not in obj or obj[name] is None:
        raise BadRecord("missing_field", f"'{name}'")
    value = obj[name]
    if not isinstance(value, str):
        raise BadRecord("wrong_type", f"'{name}' is {type(value).__name__}, expected str")
    return _clean_checked(value, name, rules)


def _clean_checked(value: str, name: str, rules: RecordRules) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        # Lone surrogates: from CSV bytes that were not UTF-8, or "\ud800" escapes in JSON.
        raise BadRecord("undecodable_bytes", f"'{name}' holds bytes that are not valid UTF-8") from None
    return clean_text(value, rules.unicode_form)


def parse_record(obj: dict[str, Any], location: str, rules: RecordRules) -> Record:
    record = _parse_record(obj, location, rules)
    if rules.max_chars is not None:
        size = record.num_chars()
        if size > rules.max_chars:
            raise BadRecord("too_long", f"{size:,} characters > data.prepare.max_chars={rules.max_chars:,}")
    return record


def _parse_record(obj: dict[str, Any], location: str, rules: RecordRules) -> Record:
    kind = rules.format if rules.format != "auto" else detect_format(obj)
    if kind in PARSERS:
        return PARSERS[kind](obj, location, rules)
    if kind == "chat":
        return Record("chat", location, messages=_parse_messages(obj, rules))
    if kind == "prompt_completion":
        prompt = _string_field(obj, "prompt", rules)
        completion = _string_field(obj, "completion", rules)
        if not completion:
            raise BadRecord("empty", "completion is empty")
        return Record(kind, location, prompt=prompt, completion=completion)
    text = _string_field(obj, "text", rules)
    if not text:
        raise BadRecord("empty", "text is empty")
    if kind == "text":
        return Record(kind, location, text=text)
    return Record(kind, location, text=text, label=_parse_label(obj, rules))


def _parse_messages(obj: dict[str, Any], rules: RecordRules) -> list[dict[str, str]]:
    raw = obj.get("messages")
    if raw is None:
        raise BadRecord("missing_field", "'messages'")
    if not isinstance(raw, list) or not raw:
        raise BadRecord("wrong_type", "'messages' must be a non-empty list")
    messages = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise BadRecord("wrong_type", f"messages[{i}] is {type(m).__name__}, expected an object")
        role = m.get("role")
        if not isinstance(role, str):
            raise BadRecord("missing_field" if role is None else "wrong_type", f"messages[{i}].role")
        if role not in rules.allowed_roles:
            raise BadRecord("unknown_role", f"messages[{i}].role={role!r}")
        content = _string_field(m, "content", rules)
        if rules.max_message_chars is not None and len(content) > rules.max_message_chars:
            raise BadRecord("too_long", f"messages[{i}] has {len(content):,} characters > "
                                        f"data.prepare.max_message_chars={rules.max_message_chars:,}")
        messages.append({"role": role, "content": content, **_message_weight(m, i)})
    if not any(m["content"] for m in messages):
        raise BadRecord("empty", "every message is empty")
    if not any(m["role"] == "assistant" and m["content"] and m.get("weight", 1) for m in messages):
        raise BadRecord("no_assistant_turn", "nothing to train on with assistant-only loss")
    return messages


def _message_weight(m: dict[str, Any], i: int) -> dict[str, int]:
    """The hosted fine-tuning format's per-assistant-message ``weight``: 0 keeps the message as
    context but out of the loss. Kept only when given, so other records hash as before."""
    if "weight" not in m:
        return {}
    weight = m["weight"]
    if m.get("role") != "assistant" or isinstance(weight, bool) or weight not in (0, 1):
        raise BadRecord("wrong_type", f"messages[{i}].weight={weight!r}: 0 or 1, on assistant messages only")
    return {"weight": int(weight)}


def _parse_label(obj: dict[str, Any], rules: RecordRules) -> str:
    if obj.get("label") is None:
        raise BadRecord("missing_field", "'label'")
    label = obj["label"]
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        raise BadRecord("wrong_type", f"'label' is {type(label).__name__}, expected str or int")
    label = clean_text(str(label), rules.unicode_form)
    if not label:
        raise BadRecord("empty", "label is empty")
    if rules.label_names is not None and label not in rules.label_names:
        raise BadRecord("unknown_label", f"label={label!r}")
    return label


# --------------------------------------------------------------------------------------
# Duplicates


# Words and runs of punctuation: "libfoo-dev" and "libfoo++-dev" (or "C" and "C++") stay
# apart, where words alone (\w+) read both as the same two words.
_TOKEN = re.compile(r"\w+|[^\w\s]+")
_FINAL_STOP = re.compile(r"[\s.!?;:,]+$")


def _loosened(value: Any, key: str = "") -> Any:
    if isinstance(value, dict):
        return {k: _loosened(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_loosened(v, key) for v in value]
    if isinstance(value, str) and key not in ("label", "role"):
        return loose_text(value)
    return value


def text_tokens(text: str) -> list[str]:
    return _TOKEN.findall(unicodedata.normalize("NFKC", text).casefold())


def loose_text(text: str) -> str:
    """Case-folded, spacing around punctuation ignored, a final full stop dropped; nothing else."""
    return " ".join(text_tokens(_FINAL_STOP.sub("", text)))


_MERSENNE_31 = (1 << 31) - 1


class NearMatch(NamedTuple):
    location: str | None  # file:line of the kept record it nearly duplicates
    similarity: float  # signature agreement: an estimate of the shingles' Jaccard similarity


class NearDuplicateIndex:
    """MinHash + LSH banding over token shingles; keeps the first of each near-duplicate group.

    Each text becomes the set of its ``shingle_words``-grams of ``text_tokens`` (words and
    punctuation runs, case-folded), hashed with CRC32 (stable across processes, unlike
    ``hash``). ``num_perm`` universal hashes ``(a*x + b) mod (2^31 - 1)`` with coefficients
    from a fixed seed give the signature. Banding (``bands`` x ``num_perm/bands`` rows) finds
    candidates whose Jaccard similarity is likely above ~(1/bands)^(bands/num_perm) (0.71 for
    16 x 8); a candidate is a duplicate only if the signature agreement (an estimate of
    Jaccard) is at least ``threshold``.

    Texts under ``min_tokens`` are left to exact (normalised) dedup. On short texts a
    Jaccard estimate is too eager: two package descriptions that differ only in a name share
    nearly all their shingles yet describe different things; and a single changed token in a
    text of n tokens leaves at best (n-9)/(n+1) of the shingles shared, so below ~50 tokens a
    real near-duplicate cannot reach 0.8 anyway. Memory: one signature (num_perm x 4 bytes),
    ``bands`` bucket entries and one location per kept text.
    """

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, bands: int = 16,
                 shingle_words: int = 5, seed: int = 0, min_tokens: int = 32):
        if num_perm % bands:
            raise ValueError("num_perm must be a multiple of bands")
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, _MERSENNE_31, size=num_perm, dtype=np.uint64)[:, None]
        self.b = rng.integers(0, _MERSENNE_31, size=num_perm, dtype=np.uint64)[:, None]
        self.threshold = threshold
        self.bands = bands
        self.rows = num_perm // bands
        self.shingle_words = shingle_words
        self.min_tokens = max(min_tokens, shingle_words)
        self._buckets: list[dict[bytes, list[int]]] = [{} for _ in range(bands)]
        self._signatures: list[np.ndarray] = []
        self._locations: list[str | None] = []

    def signature(self, text: str) -> np.ndarray | None:
        words = text_tokens(text)
        k = self.shingle_words
        if len(words) < self.min_tokens:
            return None
        shingles = {" ".join(words[i : i + k]) for i in range(len(words) - k + 1)}
        hashes = np.fromiter((zlib.crc32(s.encode("utf-8")) for s in shingles), dtype=np.uint64,
                             count=len(shingles)) % _MERSENNE_31
        sig = np.full(len(self.a), _MERSENNE_31, dtype=np.uint64)
        for start in range(0, len(hashes), 4096):  # bounds the num_perm x shingles temporary
            chunk = hashes[None, start : start + 4096]
            np.minimum(sig, ((self.a * chunk + self.b) % _MERSENNE_31).min(axis=1), out=sig)
        return sig.astype(np.uint32)

    def check_and_add(self, text: str, location: str | None = None) -> NearMatch | None:
        """The kept text that ``text`` nearly duplicates; if none, remember ``text`` and return None."""
        sig = self.signature(text)
        if sig is None:
            return None
        keys = [sig[i * self.rows : (i + 1) * self.rows].tobytes() for i in range(self.bands)]
        seen: set[int] = set()
        for bucket, key in zip(self._buckets, keys, strict=True):
            for other in bucket.get(key, ()):
                if other not in seen:
                    seen.add(other)
                    agreement = float(np.mean(self._signatures[other] == sig))
                    if agreement >= self.threshold:
                        return NearMatch(self._locations[other], agreement)
        idx = len(self._signatures)
        self._signatures.append(sig)
        self._locations.append(location)
        for bucket, key in zip(self._buckets, keys, strict=True):
            bucket.setdefault(key, []).append(idx)
        return None
