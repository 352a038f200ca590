"""Scores of generated answers (exact match, token F1, ROUGE-L): greedy decoding on a sample of prompts, on every rank.

Generation is sharded, not gathered: each rank decodes its share of the prompts with the
model as the strategy holds it (DDP replica, FSDP2 shards, ZeRO-3 partitions). Gathering
the full model onto one rank would need it to fit there, which is exactly what sharding
avoids. The price is lockstep: FSDP2 and ZeRO-3 all-gather parameters inside every forward
call (and DDP may broadcast buffers), so every rank makes the same number of forward calls,
in the same order. Each rank therefore runs ``ceil(ceil(samples / world) / micro_batch)``
batches of exactly ``max_new_tokens`` calls (one prefill, then one call per new token with
the KV cache): no rank stops early when its answers are finished, and a rank whose share
ran out decodes a dummy prompt it does not count. Counts are all-reduced at the end.

A prompt is a document of the split up to the start of its last target span (for chat
data, the final assistant turn; for prompt/completion, the completion); the reference
answer is that span, decoded without special tokens. Generated tokens count up to the first
EOS. Both are compared after ``normalize_answer`` (exact match), and as word lists
(``answer_tokens``) by token F1 and ROUGE-L, which give partial credit.
"""

from __future__ import annotations

import string
import unicodedata
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from shardtune.eval.metrics import GENERATION_METRICS, rouge_l, token_f1

_EDGE = string.punctuation + string.whitespace


def normalize_answer(text: str) -> str:
    """Unicode NFKC, case-folded, inner whitespace collapsed, punctuation/quotes trimmed at the ends.

    Inner punctuation stays: "3,4" and "34" are different answers.
    """
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(text.strip(_EDGE).split())


def exact_match(prediction: str, reference: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(reference)


_ARTICLES = frozenset({"a", "an", "the"})
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def answer_tokens(text: str) -> list[str]:
    """Words for token F1 / ROUGE-L, as SQuAD's scorer splits them: the normalised answer
    without punctuation and without English articles."""
    words = normalize_answer(text).translate(_PUNCTUATION).split()
    return [w for w in words if w not in _ARTICLES]


def answer_scores(prediction: str, reference: str) -> dict[str, float]:
    """Every generated-answer metric of one answer (``metrics.GENERATION_METRICS``)."""
    pred, ref = answer_tokens(prediction), answer_tokens(reference)
    return {"exact_match": float(exact_match(prediction, reference)), "token_f1": token_f1(pred, ref),
            "rouge_l": rouge_l(pred, ref)}


@dataclass(frozen=True)
class Sample:
    prompt: list[int]
    answer: list[int]


def _document(corpus, doc: int) -> tuple[np.ndarray, np.ndarray]:
    start, length = int(corpus.doc_offsets[doc]), int(corpus.doc_lengths[doc])
    ids = np.asarray(corpus.tokens[start : start + length], dtype=np.int64)
    if corpus.loss_mask is not None:
        mask = np.asarray(corpus.loss_mask[start : start + length], dtype=bool)
    else:
        mask = np.ones(length, dtype=bool)
    mask[: int(corpus.prompt_lengths[doc])] = False
    return ids, mask


def last_target_span(mask: np.ndarray) -> tuple[int, int] | None:
    """[start, end) of the last run of target tokens, or None when there is none."""
    hits = np.flatnonzero(mask)
    if len(hits) == 0:
        return None
    end = int(hits[-1]) + 1
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    return start, end


def corpus_of(source):
    corpus = getattr(source, "corpus", None)
    if corpus is None:
        raise ValueError(f"eval.generate needs a tokenized corpus; {type(source).__name__} has none")
    return corpus


def generation_samples(source, count: int, max_prompt_tokens: int) -> list[Sample]:
    """Up to ``count`` (prompt, answer) pairs from documents spread evenly over the split.

    Documents without a prompt before their last target span (plain text) are skipped; a
    prompt longer than ``max_prompt_tokens`` keeps its last tokens.
    """
    corpus = corpus_of(source)
    docs = corpus.num_documents
    if count <= 0 or docs == 0:
        return []
    picks: list[Sample] = []
    # Evenly spaced first, then the rest in order, so skipped documents are replaced.
    spread = np.unique(np.linspace(0, docs - 1, min(count, docs)).round().astype(np.int64)).tolist()
    chosen = set(spread)
    for doc in spread + [d for d in range(docs) if d not in chosen]:
        ids, mask = _document(corpus, doc)
        span = last_target_span(mask)
        if span is None or span[0] == 0:
            continue
        picks.append(Sample(ids[: span[0]][-max_prompt_tokens:].tolist(), ids[span[0] : span[1]].tolist()))
        if len(picks) == count:
            break
    return picks


def generate_batches(total: int, micro_batch_size: int, world_size: int) -> int:
    """Batches per rank, the same on every rank: the largest share decides."""
    share = -(-total // world_size)
    return -(-share // micro_batch_size)


def _left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[row, width - len(p):] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def greedy_lockstep(runner, prompts: list[list[int]], *, batches: int, micro_batch_size: int,
                    max_new_tokens: int, pad_id: int) -> list[list[int]]:
    """Greedy continuations of this rank's ``prompts``: ``batches * max_new_tokens`` forward calls.

    Every rank must pass the same ``batches`` (see the module docstring). Returns exactly
    ``max_new_tokens`` tokens per prompt; the caller cuts at EOS.
    """
    device = runner.ctx.device
    model = runner.model
    out: list[list[int]] = []
    dummy = [[pad_id]]
    for b in range(batches):
        chunk = prompts[b * micro_batch_size : (b + 1) * micro_batch_size]
        ids, mask = _left_pad(chunk or dummy, pad_id, device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        past, tokens = None, []
        for _ in range(max_new_tokens):
            with runner.autocast():
                output = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                               past_key_values=past, use_cache=True)
            past = output.past_key_values
            nxt = output.logits[:, -1].argmax(-1)
            tokens.append(nxt)
            ids = nxt[:, None]
            positions = positions[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        if chunk:
            out.extend(torch.stack(tokens, 1).tolist())
    return out


def cut_at_eos(tokens: list[int], eos_ids: set[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in eos_ids:
            return tokens[:i]
    return tokens


def evaluate_generation(runner, tokenizer, samples: list[Sample], *, micro_batch_size: int,
                        max_new_tokens: int, rank: int, world_size: int, examples: int = 0) -> dict:
    """``exact_match``, ``token_f1`` and ``rouge_l`` over ``samples`` (identical on every rank),
    and rank 0's first ``examples``."""
    mine = samples[rank::world_size]
    batches = generate_batches(len(samples), micro_batch_size, world_size)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    was_training = runner.model.training
    runner.train(False)
    try:
        generated = greedy_lockstep(runner, [s.prompt for s in mine], batches=batches,
                                    micro_batch_size=micro_batch_size, max_new_tokens=max_new_tokens,
                                    pad_id=pad_id)
    finally:
        runner.train(was_training)
    sums, shown = dict.fromkeys(GENERATION_METRICS, 0.0), []
    for sample, tokens in zip(mine, generated, strict=True):
        answer = tokenizer.decode(cut_at_eos(tokens, eos_ids), skip_special_tokens=True)
        reference = tokenizer.decode(sample.answer, skip_special_tokens=True)
        scores = answer_scores(answer, reference)
        for key, value in scores.items():
            sums[key] += value
        if len(shown) < examples:
            shown.append({"prompt": tokenizer.decode(sample.prompt, skip_special_tokens=True)[-200:],
                          "reference": reference.strip(), "generated": answer.strip(),
                          "match": bool(scores["exact_match"])})
    counts = torch.tensor([*(sums[k] for k in GENERATION_METRICS), float(len(mine))], dtype=torch.float64,
                          device=runner.ctx.device)
    dist.all_reduce(counts)
    total = counts[-1].item()
    out = {k: counts[i].item() / total if total else float("nan") for i, k in enumerate(GENERATION_METRICS)}
    return {**out, "generated": int(total), "generations": shown}
