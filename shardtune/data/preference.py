"""Feedback data: preference pairs and ratings, from raw records to the pairs a preference run reads.

Accepted records (``data.prepare.format: preference``, or ``auto``):

* pairs: ``{"prompt": str | [messages], "chosen": ..., "rejected": ...}`` or
  ``{"messages": [...], "chosen": ..., "rejected": ...}``, where a response is a string or a list
  holding one assistant message;
* the hosted fine-tuning preference format: ``{"input": {"messages": [...]},
  "preferred_output": [assistant message], "non_preferred_output": [assistant message]}``;
* ratings: ``{"messages" | "prompt": ..., "response": str, "rating": number, "correction"?: str}``.

Ratings become pairs per prompt (``pair_ratings``), within one input file, by this rule:
every two ratings of one prompt with different values give the pair (higher over lower);
equal ratings give none (a tie says nothing about which is better); a record with a
``correction`` also gives (correction over its own response). A rating in no pair is dropped
with its reason: ``single_response`` (the only response to its prompt, no correction),
``tied_ratings`` (every response to its prompt rated alike) or ``identical_responses``. Each
rating record is thus either paired or dropped (``RatingsTally``, in ``ratings.json`` of the
prepared directory), and each pair is then a record like any other input: validated,
de-duplicated, split, tokenized and counted in ``report.json``.

Stored layout, one document per pair: ``prompt + chosen + prompt + rejected`` with the loss
mask 0/1/0/1 over those four runs, so each half is an ordinary SFT document and both hold
exactly the same prompt tokens (the prompt is tokenized once). The split key is the prompt's
hash: every pair of one prompt lands in the same split, so no validation prompt is trained on.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shardtune.data.records import PARSERS, BadRecord, Record, RecordRules, clean_text

PAIR_KEYS = ("chosen", "preferred_output", "rating")


# --------------------------------------------------------------------------------------
# Parsing


@dataclass
class PreferenceRecord(Record):
    """``messages`` (a chat prompt) or ``prompt`` (plain text), and the two responses."""

    chosen: str = ""
    rejected: str = ""

    def _prompt_content(self) -> dict[str, Any]:
        return {"messages": self.messages} if self.messages else {"prompt": self.prompt}

    def content(self) -> dict[str, Any]:
        return {**self._prompt_content(), "chosen": self.chosen, "rejected": self.rejected}

    def content_digest(self) -> bytes:
        # Bytes 0-7 (dedup, document key) hash the whole pair; bytes 8-15 (the split) hash the
        # prompt alone, so all pairs of one prompt share a split.
        whole = json.dumps(["preference", self.content()], ensure_ascii=False, sort_keys=True)
        prompt = json.dumps(["preference", self._prompt_content()], ensure_ascii=False, sort_keys=True)
        return (hashlib.blake2b(whole.encode(), digest_size=8).digest()
                + hashlib.blake2b(prompt.encode(), digest_size=8).digest())

    def plain_text(self) -> str:
        prompt = "\n".join(m["content"] for m in self.messages) if self.messages else self.prompt
        return "\n".join((prompt, self.chosen, self.rejected))


def _text(value: Any, name: str, rules: RecordRules) -> str:
    if value is None:
        raise BadRecord("missing_field", f"'{name}'")
    if not isinstance(value, str):
        raise BadRecord("wrong_type", f"'{name}' is {type(value).__name__}, expected str")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRecord("undecodable_bytes", f"'{name}' holds bytes that are not valid UTF-8") from None
    return clean_text(value, rules.unicode_form)


def _messages(raw: Any, name: str, rules: RecordRules) -> list[dict[str, str]]:
    if not isinstance(raw, list) or not raw:
        raise BadRecord("wrong_type", f"'{name}' must be a non-empty list of messages")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise BadRecord("wrong_type", f"{name}[{i}] is {type(m).__name__}, expected an object")
        role = m.get("role")
        if not isinstance(role, str):
            raise BadRecord("missing_field" if role is None else "wrong_type", f"{name}[{i}].role")
        if role not in rules.allowed_roles:
            raise BadRecord("unknown_role", f"{name}[{i}].role={role!r}")
        out.append({"role": role, "content": _text(m.get("content"), f"{name}[{i}].content", rules)})
    return out


def _response(raw: Any, name: str, rules: RecordRules) -> str:
    """A string, or a list of exactly one assistant message (the hosted formats' shape)."""
    if isinstance(raw, list):
        messages = _messages(raw, name, rules)
        if len(messages) != 1 or messages[0]["role"] != "assistant":
            raise BadRecord("wrong_type", f"'{name}' must hold exactly one assistant message")
        text = messages[0]["content"]
    else:
        text = _text(raw, name, rules)
    if not text:
        raise BadRecord("empty", f"'{name}' is empty")
    return text


def _prompt(obj: dict[str, Any], rules: RecordRules) -> tuple[list[dict[str, str]], str]:
    """(chat messages, "") or ([], prompt text)."""
    if isinstance(obj.get("input"), dict):  # hosted preference format
        return _messages(obj["input"].get("messages"), "input.messages", rules), ""
    if "messages" in obj:
        return _messages(obj["messages"], "messages", rules), ""
    if isinstance(obj.get("prompt"), list):
        return _messages(obj["prompt"], "prompt", rules), ""
    text = _text(obj.get("prompt"), "prompt", rules)
    if not text:
        raise BadRecord("empty", "prompt is empty")
    return [], text


def parse_preference(obj: dict[str, Any], location: str, rules: RecordRules) -> PreferenceRecord:
    if "rating" in obj:
        # Ratings only mean something next to the other ratings of their prompt (pair_ratings).
        raise BadRecord("unpaired_rating", "ratings are paired per prompt before parsing")
    messages, prompt = _prompt(obj, rules)
    if "preferred_output" in obj or "non_preferred_output" in obj:
        chosen = _response(obj.get("preferred_output"), "preferred_output", rules)
        rejected = _response(obj.get("non_preferred_output"), "non_preferred_output", rules)
    else:
        chosen = _response(obj.get("chosen"), "chosen", rules)
        rejected = _response(obj.get("rejected"), "rejected", rules)
    if chosen == rejected:
        raise BadRecord("identical_responses", "chosen and rejected are the same text")
    return PreferenceRecord("preference", location, messages=messages, prompt=prompt,
                            chosen=chosen, rejected=rejected)


PARSERS["preference"] = parse_preference  # records.parse_record dispatches here


# --------------------------------------------------------------------------------------
# Ratings -> pairs


@dataclass
class RatingsTally:
    """Every rating record read is paired or dropped for a reason."""

    read: int = 0
    paired: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    pairs_from_ratings: int = 0
    pairs_from_corrections: int = 0

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def check(self) -> None:
        if self.read != self.paired + sum(self.dropped.values()):
            raise AssertionError(f"ratings read ({self.read}) != paired ({self.paired}) + dropped ({self.dropped})")

    def to_dict(self) -> dict:
        self.check()
        return {"ratings_read": self.read, "ratings_paired": self.paired,
                "ratings_dropped_by_reason": dict(sorted(self.dropped.items())),
                "pairs_from_ratings": self.pairs_from_ratings, "pairs_from_corrections": self.pairs_from_corrections}

    def write(self, out_dir: Path) -> None:
        if self.read:
            (out_dir / "ratings.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")


@dataclass
class _Rating:
    location: str
    prompt: dict[str, Any]  # the raw prompt fields, passed on to the pair
    response: str
    rating: float
    correction: str | None


def _parse_rating(obj: dict[str, Any], location: str, rules: RecordRules) -> tuple[str, _Rating]:
    messages, text = _prompt(obj, rules)
    key = json.dumps(messages or text, ensure_ascii=False, sort_keys=True)
    rating = obj.get("rating")
    if isinstance(rating, bool) or not isinstance(rating, (int, float)) or rating != rating:
        raise BadRecord("wrong_type", f"'rating' is {rating!r}, expected a number")
    response = _text(obj.get("response"), "response", rules)
    if not response:
        raise BadRecord("empty", "'response' is empty")
    correction = obj.get("correction")
    correction = _text(correction, "correction", rules) or None if correction is not None else None
    prompt = {"messages": messages} if messages else {"prompt": text}
    return key, _Rating(location, prompt, response, float(rating), correction)


def pair_ratings(items, rules: RecordRules, tally: RatingsTally | None = None) -> Iterator[tuple[str, Any]]:
    """Pass every item through, except rating records, which are grouped by prompt and yielded
    (after the others) as pairs with location ``chosen's>rejected's``, or as drops."""
    tally = tally if tally is not None else RatingsTally()
    groups: dict[str, list[_Rating]] = {}
    for location, raw in items:
        if not isinstance(raw, dict) or "rating" not in raw:
            yield location, raw
            continue
        tally.read += 1
        try:
            key, rating = _parse_rating(raw, location, rules)
        except BadRecord as bad:
            tally.drop(bad.reason)
            yield location, bad
            continue
        groups.setdefault(key, []).append(rating)
    for group in groups.values():
        yield from _group_pairs(group, tally)
    tally.check()


def _group_pairs(group: list[_Rating], tally: RatingsTally) -> Iterator[tuple[str, Any]]:
    used = [False] * len(group)
    for i, r in enumerate(group):
        if r.correction and r.correction != r.response:
            used[i] = True
            tally.pairs_from_corrections += 1
            yield f"{r.location}(correction)>{r.location}", {**r.prompt, "chosen": r.correction, "rejected": r.response}
    for i, a in enumerate(group):
        for j in range(i + 1, len(group)):
            b = group[j]
            if a.rating == b.rating or a.response == b.response:
                continue
            hi, lo = (a, b) if a.rating > b.rating else (b, a)
            used[i] = used[j] = True
            tally.pairs_from_ratings += 1
            yield f"{hi.location}>{lo.location}", {**hi.prompt, "chosen": hi.response, "rejected": lo.response}
    for i, r in enumerate(group):
        if used[i]:
            tally.paired += 1
            continue
        if len(group) == 1:
            reason, detail = "single_response", "the only response to its prompt, and no correction"
        elif len({g.rating for g in group}) == 1:
            reason, detail = "tied_ratings", f"every response to its prompt is rated {r.rating:g}"
        else:
            reason, detail = "identical_responses", "its differently rated responses are the same text"
        tally.drop(reason)
        yield r.location, BadRecord(reason, detail)


# --------------------------------------------------------------------------------------
# Encoding: record -> one document prompt + chosen + prompt + rejected


def encode_preferences(encoder, records: list[PreferenceRecord]) -> list[tuple[np.ndarray, np.ndarray]]:
    """``encoder``: the ``DocumentEncoder`` (tokenizer, chat template, bos/eos)."""
    prompts, chosen, rejected = [], [], []
    for r in records:
        if r.messages:
            prompt = encoder._render(r.messages, True)
            responses = []
            for text in (r.chosen, r.rejected):
                full = encoder._render([*r.messages, {"role": "assistant", "content": text}], False)
                if not full.startswith(prompt):
                    from shardtune.errors import DataError

                    raise DataError(f"{r.location}: the chat template does not render the conversation with "
                                    "its reply as an extension of the prompt; give data.prepare.chat_template")
                responses.append(full[len(prompt):])
            prompts.append(prompt)
        else:
            prompts.append(r.prompt + "\n")  # the prompt/completion layout of SFT documents
            responses = [r.chosen, r.rejected]
        chosen.append(responses[0])
        rejected.append(responses[1])
    tok = encoder.tokenizer
    p_ids = tok(prompts, add_special_tokens=False)["input_ids"]
    c_ids = tok(chosen, add_special_tokens=False)["input_ids"]
    r_ids = tok(rejected, add_special_tokens=False)["input_ids"]
    out = []
    for r, p, c, j in zip(records, p_ids, c_ids, r_ids, strict=True):
        # The chat template closes a reply itself; plain prompts get BOS and EOS as SFT does.
        p, c, j = (p, c, j) if r.messages else (encoder.bos + p, c + encoder.eos, j + encoder.eos)
        ids = np.asarray([*p, *c, *p, *j], dtype=np.int64)
        mask = np.concatenate([np.zeros(len(p), np.uint8), np.ones(len(c), np.uint8),
                               np.zeros(len(p), np.uint8), np.ones(len(j), np.uint8)])
        out.append((ids, mask))
    return out
