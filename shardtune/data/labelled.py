"""Labelled text for sequence classification: a built-in topic dataset and padded examples.

Unlike causal-LM data, classification examples are not packed: each text is one row,
truncated/padded to ``data.seq_len``, with one label. An epoch is a permutation of the
rows seeded by (seed, epoch), so the global data cursor of ``GlobalBatchLoader`` (and its
resume at any world size) works unchanged.

The built-in dataset (``data.source: synthetic`` with ``task: classification``) is topic
classification of templated news-like sentences. It has real but imperfect signal: a share
of the sentences mixes in a distractor phrase from another topic, some use only generic
wording, and a small share of labels is flipped, so accuracy saturates below 100%.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

TOPICS = {
    "sports": {
        "subjects": ["the striker", "the home team", "the goalkeeper", "our captain", "the coach",
                     "the young sprinter", "the tennis champion", "the visiting side", "the referee"],
        "verbs": ["scored in", "celebrated after", "trained hard before", "was injured during",
                  "complained about", "dominated", "lost", "won"],
        "objects": ["the final match", "the league game", "the penalty shootout", "the marathon",
                    "the second half", "the championship", "the derby", "the relay race"],
    },
    "technology": {
        "subjects": ["the software team", "the startup", "the chip maker", "our engineers",
                     "the app developer", "the security researcher", "the cloud provider", "the robot"],
        "verbs": ["released", "patched", "debugged", "announced", "shipped", "rewrote", "tested", "upgraded"],
        "objects": ["a new smartphone", "the operating system", "the database server", "an AI model",
                    "the browser update", "a faster processor", "the encryption library", "the network"],
    },
    "cooking": {
        "subjects": ["the chef", "my grandmother", "the baker", "the restaurant", "the food critic",
                     "the pastry cook", "our kitchen staff", "the home cook"],
        "verbs": ["roasted", "baked", "seasoned", "served", "tasted", "simmered", "prepared", "grilled"],
        "objects": ["the garlic chicken", "a chocolate cake", "the vegetable soup", "fresh bread",
                    "the spicy curry", "a lemon tart", "the pasta sauce", "grilled salmon"],
    },
    "weather": {
        "subjects": ["the forecast", "the storm", "a cold front", "the heatwave", "heavy rain",
                     "the meteorologist", "strong wind", "the morning fog"],
        "verbs": ["hit", "moved across", "was expected over", "flooded", "cooled", "battered",
                  "lingered over", "warned about"],
        "objects": ["the coastal towns", "the valley", "the northern region", "the city overnight",
                    "the mountains", "the harbour", "the farmland", "the weekend"],
    },
}
GENERIC_SUBJECTS = ["someone", "a local reporter", "my neighbour", "the article", "people"]
GENERIC_TAILS = ["yesterday.", "this week.", "on Monday.", "again.", "according to reports.",
                 "late in the evening.", "earlier than expected.", "."]
DISTRACTORS = {
    "sports": "near the stadium", "technology": "while checking a phone",
    "cooking": "over lunch", "weather": "despite the rain",
}


def generate_labelled_records(num_records: int, seed: int, *, label_noise: float = 0.03,
                              distractor_rate: float = 0.25, generic_rate: float = 0.2) -> list[dict[str, str]]:
    """Topic-labelled sentences: ``{"text": ..., "label": topic}``."""
    rng = random.Random(seed)
    names = list(TOPICS)
    records = []
    for _ in range(num_records):
        topic = rng.choice(names)
        vocab = TOPICS[topic]
        subject = rng.choice(GENERIC_SUBJECTS if rng.random() < generic_rate else vocab["subjects"])
        parts = [subject, rng.choice(vocab["verbs"]), rng.choice(vocab["objects"])]
        if rng.random() < distractor_rate:
            parts.append(DISTRACTORS[rng.choice([n for n in names if n != topic])])
        text = " ".join(parts) + " " + rng.choice(GENERIC_TAILS)
        label = rng.choice(names) if rng.random() < label_noise else topic
        records.append({"text": text[0].upper() + text[1:].replace(" .", "."), "label": label})
    return records


@dataclass(frozen=True)
class LabelledExamples:
    input_ids: np.ndarray  # [N, seq_len] int64
    attention_mask: np.ndarray  # [N, seq_len] int64
    labels: np.ndarray  # [N] int64

    def __len__(self) -> int:
        return len(self.labels)


class ClassificationEpoch:
    def __init__(self, examples: LabelledExamples, order: np.ndarray):
        self.examples = examples
        self.order = order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, k: int) -> dict[str, np.ndarray]:
        i = int(self.order[k])
        ex = self.examples
        return {"input_ids": ex.input_ids[i], "attention_mask": ex.attention_mask[i], "labels": ex.labels[i]}


@dataclass
class ClassificationSource:
    """A ``SequenceSource`` of labelled rows; ``shuffle=False`` keeps the file order (evaluation)."""

    examples: LabelledExamples
    seed: int
    shuffle: bool = True

    def epoch(self, epoch: int) -> ClassificationEpoch:
        n = len(self.examples)
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        return ClassificationEpoch(self.examples, order)

    def label_counts(self, num_labels: int) -> list[int]:
        return np.bincount(self.examples.labels, minlength=num_labels).tolist()


def pad_rows(rows: list[list[int]], labels: list[int], seq_len: int, pad_id: int) -> LabelledExamples:
    ids = np.full((len(rows), seq_len), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), seq_len), dtype=np.int64)
    for i, row in enumerate(rows):
        row = row[:seq_len]
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return LabelledExamples(ids, mask, np.asarray(labels, dtype=np.int64))


def encode_texts(texts: list[str], labels: list[int], tokenizer, seq_len: int) -> LabelledExamples:
    """Tokenize with the model's own special tokens ([CLS] ... [SEP] for BERT), truncate, pad."""
    rows = tokenizer(texts, truncation=True, max_length=seq_len)["input_ids"]
    return pad_rows(rows, labels, seq_len, tokenizer.pad_token_id)


def label_vocabulary(records: list[dict], label_names: list[str] | None) -> list[str]:
    if label_names:
        return list(label_names)
    return sorted({str(r["label"]) for r in records})


def examples_from_records(records: list[dict], names: list[str], tokenizer, seq_len: int) -> LabelledExamples:
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted({str(r["label"]) for r in records} - set(index))
    if unknown:
        raise ValueError(f"labels {unknown[:5]} are not among the label names {names}")
    return encode_texts([r["text"] for r in records], [index[str(r["label"])] for r in records], tokenizer, seq_len)


def examples_from_prepared(source, tokenizer, seq_len: int) -> LabelledExamples:
    """Rows from prepared shards (``format: labelled``): the text part of each document.

    ``data prepare`` stores a labelled record as ``bos + text + "\\n" + label + eos`` with the
    label's class id in ``doc_labels.npy``; the classifier sees ``text`` only, framed by the
    tokenizer's own special tokens.
    """
    corpus = source.corpus
    labels = _prepared_labels(source)
    bos = 1 if tokenizer.bos_token_id is not None else 0
    rows, kept = [], []
    for d in range(corpus.num_documents):
        if labels[d] < 0:
            continue
        start = int(corpus.doc_offsets[d])
        body = np.asarray(corpus.tokens[start + bos : start + int(corpus.prompt_lengths[d])]).tolist()
        rows.append(tokenizer.build_inputs_with_special_tokens(body))
        kept.append(int(labels[d]))
    if not rows:
        raise ValueError(f"{source.prepared_dir}: the {source.split!r} split has no labelled documents")
    return pad_rows(rows, kept, seq_len, tokenizer.pad_token_id)


def _prepared_labels(source) -> np.ndarray:
    shards = source.manifest["splits"][source.split]["shards"]
    return np.concatenate([np.load(source.prepared_dir / s["path"] / "doc_labels.npy") for s in shards])
