"""Reading raw inputs into validated, normalised records, and removing duplicates.

Every raw record read from a file either becomes a ``Record`` or a ``BadRecord`` carrying a
drop reason and its ``file:line`` (``file:row`` for Parquet), so the preparation report can
account for each one. Nothing here tokenizes.

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

import csv
import hashlib
import json
import re
import unicodedata
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FORMATS = ("chat", "prompt_completion", "text", "labelled")


class BadRecord(Exception):
    """A raw record that cannot be used; ``reason`` is the short key counted in the report."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


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
        """Hash of the normalised content: the exact-dedup key and the split key."""
        canonical = json.dumps([self.kind, self.content()], ensure_ascii=False, sort_keys=True)
        return hashlib.blake2b(canonical.encode("utf-8"), digest_size=16).digest()

    def plain_text(self) -> str:
        """All content as one string, for near-duplicate detection."""
        if self.kind == "chat":
            return "\n".join(m["content"] for m in self.messages)
        if self.kind == "prompt_completion":
            return self.prompt + "\n" + self.completion
        return self.text


# --------------------------------------------------------------------------------------
# Reading files: yields (location, raw object or BadRecord)

RawItem = tuple[str, "dict[str, Any] | BadRecord"]


def read_raw_records(path: Path, file_type: str = "auto") -> Iterator[RawItem]:
    if not path.is_file():
        raise FileNotFoundError(f"input file not found: {path}")
    kind = file_type if file_type != "auto" else _file_type_from_suffix(path)
    if kind == "jsonl":
        yield from _read_jsonl(path)
    elif kind == "csv":
        yield from _read_csv(path)
    else:
        yield from _read_parquet(path)


def _file_type_from_suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffix in (".csv", ".tsv"):
        return "csv"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    raise ValueError(f"{path}: cannot tell the file type from its suffix; set data.prepare.file_type")


def _read_jsonl(path: Path) -> Iterator[RawItem]:
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            where = f"{path}:{lineno}"
            if not raw.strip():
                yield where, BadRecord("blank_line")
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield where, BadRecord("undecodable_bytes", str(exc))
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                yield where, BadRecord("malformed_json", str(exc))
                continue
            yield where, obj if isinstance(obj, dict) else BadRecord("not_an_object", type(obj).__name__)


def _read_csv(path: Path) -> Iterator[RawItem]:
    # surrogateescape keeps undecodable bytes visible as lone surrogates, so one bad row
    # is dropped instead of the whole file failing to decode.
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with path.open("r", encoding="utf-8", errors="surrogateescape", newline="") as fh:
        reader = csv.DictReader(fh, delimiter=delimiter)
        start_line = reader.line_num + 1
        for row in reader:
            where = f"{path}:{start_line}"
            start_line = reader.line_num + 1
            if None in row or any(v is None for v in row.values()):
                yield where, BadRecord("malformed_csv", "wrong number of columns")
                continue
            yield where, {k: _maybe_json_list(v) for k, v in row.items()}


def _maybe_json_list(value: str) -> Any:
    # CSV has no nested types: a chat's ``messages`` column holds a JSON list.
    if value.startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _read_parquet(path: Path) -> Iterator[RawItem]:
    import pyarrow.parquet as pq

    row = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
        for obj in batch.to_pylist():
            row += 1
            yield f"{path}:row{row}", obj


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


def detect_format(obj: dict[str, Any]) -> str:
    if "messages" in obj:
        return "chat"
    if "prompt" in obj or "completion" in obj:
        return "prompt_completion"
    if "label" in obj:
        return "labelled"
    if "text" in obj:
        return "text"
    raise BadRecord("missing_field", f"no 'messages', 'prompt'/'completion' or 'text' among {sorted(obj)}")


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
    kind = rules.format if rules.format != "auto" else detect_format(obj)
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
        messages.append({"role": role, "content": content})
    if not any(m["content"] for m in messages):
        raise BadRecord("empty", "every message is empty")
    if not any(m["role"] == "assistant" and m["content"] for m in messages):
        raise BadRecord("no_assistant_turn", "nothing to train on with assistant-only loss")
    return messages


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
# Near-duplicate detection


_WORD = re.compile(r"\w+")
_MERSENNE_31 = (1 << 31) - 1


class NearDuplicateIndex:
    """MinHash + LSH banding over word shingles; keeps the first of each near-duplicate group.

    Each text becomes the set of its lower-cased word ``shingle_words``-grams, hashed with
    CRC32 (stable across processes, unlike ``hash``). ``num_perm`` universal hashes
    ``(a*x + b) mod (2^31 - 1)`` with coefficients from a fixed seed give the signature.
    Banding (``bands`` x ``num_perm/bands`` rows) finds candidates whose Jaccard similarity is
    likely above ~(1/bands)^(bands/num_perm) (0.71 for 16 x 8); a candidate is a duplicate
    only if the signature agreement (an estimate of Jaccard) is at least ``threshold``.
    Texts shorter than one shingle are left to exact dedup. Memory: one signature
    (num_perm x 4 bytes) plus ``bands`` bucket entries per kept text.
    """

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, bands: int = 16,
                 shingle_words: int = 5, seed: int = 0):
        if num_perm % bands:
            raise ValueError("num_perm must be a multiple of bands")
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, _MERSENNE_31, size=num_perm, dtype=np.uint64)[:, None]
        self.b = rng.integers(0, _MERSENNE_31, size=num_perm, dtype=np.uint64)[:, None]
        self.threshold = threshold
        self.bands = bands
        self.rows = num_perm // bands
        self.shingle_words = shingle_words
        self._buckets: list[dict[bytes, list[int]]] = [{} for _ in range(bands)]
        self._signatures: list[np.ndarray] = []

    def signature(self, text: str) -> np.ndarray | None:
        words = _WORD.findall(text.lower())
        k = self.shingle_words
        if len(words) < k:
            return None
        shingles = {" ".join(words[i : i + k]) for i in range(len(words) - k + 1)}
        hashes = np.fromiter((zlib.crc32(s.encode("utf-8")) for s in shingles), dtype=np.uint64,
                             count=len(shingles)) % _MERSENNE_31
        sig = np.full(len(self.a), _MERSENNE_31, dtype=np.uint64)
        for start in range(0, len(hashes), 4096):  # bounds the num_perm x shingles temporary
            chunk = hashes[None, start : start + 4096]
            np.minimum(sig, ((self.a * chunk + self.b) % _MERSENNE_31).min(axis=1), out=sig)
        return sig.astype(np.uint32)

    def check_and_add(self, text: str) -> bool:
        """True if ``text`` nearly duplicates an earlier kept text; otherwise remember it."""
        sig = self.signature(text)
        if sig is None:
            return False
        keys = [sig[i * self.rows : (i + 1) * self.rows].tobytes() for i in range(self.bands)]
        seen: set[int] = set()
        for bucket, key in zip(self._buckets, keys, strict=True):
            for other in bucket.get(key, ()):
                if other not in seen:
                    seen.add(other)
                    if np.mean(self._signatures[other] == sig) >= self.threshold:
                        return True
        idx = len(self._signatures)
        self._signatures.append(sig)
        for bucket, key in zip(self._buckets, keys, strict=True):
            bucket.setdefault(key, []).append(idx)
        return False
