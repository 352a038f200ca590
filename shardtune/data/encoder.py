"""Tokenizing prepared records once: token ids plus a per-token loss mask."""

from __future__ import annotations

import numpy as np

from shardtune.data.records import Record
from shardtune.errors import DataError

# Used when neither the config nor the tokenizer has a chat template. The end-of-turn token
# follows each message, so the assistant span (and its loss) includes learning to stop.
BUILTIN_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + eos_token + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def resolve_chat_template(tokenizer, configured: str | None) -> tuple[str, str]:
    """(template, where it came from): the config's, the tokenizer's, or the built-in one."""
    if configured:
        return configured, "config"
    own = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if isinstance(own, str) and own:
        return own, "tokenizer"
    return BUILTIN_CHAT_TEMPLATE, "builtin"


class DocumentEncoder:
    """Records -> (token ids, loss mask): the mask is 1 only on tokens the model learns.

    Chat: the rendered conversation is tokenized once; tokens starting inside an assistant
    turn's character span are targets. A turn's span runs from the end of the rendering of
    the conversation before it (with the generation prompt) to the end of the rendering
    including it, so it covers the reply and its end-of-turn marker.
    Prompt/completion: targets are the completion and EOS. Labelled text is a
    prompt/completion pair whose completion is the label (the class id is stored too).
    Plain text: every token is a target.
    """

    def __init__(self, tokenizer, chat_template: str):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self.eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def encode(self, records: list[Record]) -> list[tuple[np.ndarray, np.ndarray]]:
        out: list = [None] * len(records)
        chats = [i for i, r in enumerate(records) if r.kind == "chat"]
        pairs = [i for i, r in enumerate(records) if r.kind in ("prompt_completion", "labelled")]
        texts = [i for i, r in enumerate(records) if r.kind == "text"]
        preferences = [i for i, r in enumerate(records) if r.kind == "preference"]
        if preferences:
            from shardtune.data.preference import encode_preferences

            for i, encoded in zip(preferences, encode_preferences(self, [records[i] for i in preferences]), strict=True):
                out[i] = encoded
        if chats:
            for i, encoded in zip(chats, self._encode_chats([records[i] for i in chats]), strict=True):
                out[i] = encoded
        if pairs:
            prompts = [self._prompt_of(records[i]) for i in pairs]
            completions = [self._completion_of(records[i]) for i in pairs]
            p_ids = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
            c_ids = self.tokenizer(completions, add_special_tokens=False)["input_ids"]
            for i, p, c in zip(pairs, p_ids, c_ids, strict=True):
                ids = self.bos + p + c + self.eos
                out[i] = _arrays(ids, len(self.bos) + len(p))
        if texts:
            t_ids = self.tokenizer([records[i].text for i in texts], add_special_tokens=False)["input_ids"]
            for i, t in zip(texts, t_ids, strict=True):
                out[i] = _arrays(self.bos + t + self.eos, 0)
        return out

    @staticmethod
    def _prompt_of(record: Record) -> str:
        # Same layout as the in-memory corpus (corpus.tokenize_records).
        return (record.prompt if record.kind == "prompt_completion" else record.text) + "\n"

    @staticmethod
    def _completion_of(record: Record) -> str:
        return record.completion if record.kind == "prompt_completion" else record.label

    def _render(self, messages, generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, tokenize=False,
            add_generation_prompt=generation_prompt,
        )

    def _encode_chats(self, records: list[Record]):
        rendered, spans = [], []
        for r in records:
            full = self._render(r.messages, False)
            record_spans = []
            for i, m in enumerate(r.messages):
                if m["role"] != "assistant" or m.get("weight", 1) == 0:  # weight 0: context, no loss
                    continue
                before = self._conversation_before(r.messages[:i])
                upto = self._render(r.messages[: i + 1], False)
                if not (full.startswith(upto) and upto.startswith(before)):
                    raise DataError(
                        f"{r.location}: the chat template does not render conversations as prefixes of "
                        "each other, so the assistant-only loss mask cannot be computed; give "
                        "data.prepare.chat_template"
                    )
                record_spans.append((len(before), len(upto)))
            rendered.append(full)
            spans.append(record_spans)
        enc = self.tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
        results = []
        for ids, offsets, record_spans in zip(enc["input_ids"], enc["offset_mapping"], spans, strict=True):
            starts = np.fromiter((o[0] for o in offsets), dtype=np.int64, count=len(offsets))
            mask = np.zeros(len(ids), dtype=np.uint8)
            for s, e in record_spans:
                mask[(starts >= s) & (starts < e)] = 1
            results.append((np.asarray(ids, dtype=np.int64), mask))
        return results

    def _conversation_before(self, messages) -> str:
        if messages:
            return self._render(messages, True)
        try:
            return self._render([], True)
        except Exception:  # templates may reject an empty conversation
            return ""


def _arrays(ids: list[int], prompt_length: int) -> tuple[np.ndarray, np.ndarray]:
    mask = np.ones(len(ids), dtype=np.uint8)
    mask[:prompt_length] = 0
    return np.asarray(ids, dtype=np.int64), mask
