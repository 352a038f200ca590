"""Exact match of generated answers: normalisation, prompt/answer extraction from chat data,
lockstep greedy decoding (batched = one by one = Hugging Face ``generate``; the same number of
forward calls on every rank), and real 2-rank runs under DDP and FSDP2 with uneven shares."""

from __future__ import annotations

import contextlib
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import run_shardtune

from shardtune.config import PrepareSection
from shardtune.data.packing import TokenizedCorpus
from shardtune.eval.generate import (
    cut_at_eos,
    exact_match,
    generate_batches,
    generation_samples,
    greedy_lockstep,
    last_target_span,
    normalize_answer,
)


@pytest.mark.parametrize("prediction, reference, same", [
    ("Brightwater", "brightwater", True),
    ("  Brightwater.\n", "Brightwater", True),
    ('"11 45 82"', "11  45\t82", True),
    ("ｂｒｉｇｈｔ", "bright", True),  # NFKC folds full-width letters
    ("3,4", "34", False),  # inner punctuation is part of the answer
    ("Bright water", "Brightwater", False),
    ("", "x", False),
])
def test_normalised_exact_match(prediction, reference, same):
    assert exact_match(prediction, reference) is same
    assert normalize_answer("  The  END!! ") == "the end"


def test_last_target_span_is_the_final_assistant_turn():
    mask = np.array([0, 0, 1, 1, 0, 0, 0, 1, 1, 1, 0], dtype=bool)
    assert last_target_span(mask) == (7, 10)
    assert last_target_span(np.zeros(4, dtype=bool)) is None
    assert cut_at_eos([5, 6, 2, 7], {2}) == [5, 6]


def test_samples_come_from_documents_with_a_prompt():
    docs = [[1, 10, 11, 12, 2], [1, 20, 21, 2], [1, 30, 31, 32, 33, 2]]
    corpus = TokenizedCorpus.from_documents(docs, [3, 0, 2], vocab_size=64)
    # Chat-like mask: two assistant spans in document 2; document 1 is plain text (no prompt).
    mask = np.concatenate([[0, 0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 1, 0, 1, 1]]).astype(np.uint8)
    corpus = TokenizedCorpus(corpus.tokens, corpus.doc_offsets, corpus.doc_lengths, corpus.prompt_lengths, mask)
    samples = generation_samples(SimpleNamespace(corpus=corpus), 3, max_prompt_tokens=3)
    # Document 2's prompt runs up to its last span and keeps its last 3 tokens.
    assert [(s.prompt, s.answer) for s in samples] == [([1, 10, 11], [12, 2]), ([30, 31, 32], [33, 2])]


def _tiny_llama(vocab: int = 100):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(config).eval()
    model.config.use_cache = False  # as training leaves it: generation asks for the cache itself
    return model


class _CountingRunner:
    def __init__(self, model):
        self.model, self.calls = model, 0
        self.ctx = SimpleNamespace(device=torch.device("cpu"))
        model.register_forward_pre_hook(self._count)

    def _count(self, *_):
        self.calls += 1

    def train(self, mode=True):
        self.model.train(mode)

    def autocast(self):
        return contextlib.nullcontext()


def test_lockstep_batches_match_generate_and_make_a_fixed_number_of_calls():
    model = _tiny_llama()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [20, 21, 22, 23], [40]]
    reference = [model.generate(torch.tensor([p]), max_new_tokens=6, min_new_tokens=6, do_sample=False,
                                pad_token_id=0, eos_token_id=None)[0, len(p):].tolist() for p in prompts]
    # 5 prompts on 2 ranks with micro-batches of 2: rank 0 has 3 prompts, rank 1 has 2, and
    # both must run generate_batches(5, 2, 2) = 2 batches of 6 calls each.
    batches = generate_batches(5, 2, 2)
    assert batches == 2
    rank1 = _CountingRunner(model)
    left_padded = greedy_lockstep(rank1, prompts[:2], batches=batches, micro_batch_size=2, max_new_tokens=6, pad_id=0)
    assert left_padded == reference[:2]
    rank0 = _CountingRunner(_tiny_llama())
    out = greedy_lockstep(rank0, prompts[:3], batches=batches, micro_batch_size=2, max_new_tokens=6, pad_id=0)
    assert out == reference[:3]
    assert rank0.calls == rank1.calls == batches * 6
    empty = _CountingRunner(_tiny_llama())  # a rank with no prompt at all still keeps step
    assert greedy_lockstep(empty, [], batches=batches, micro_batch_size=2, max_new_tokens=6, pad_id=0) == []
    assert empty.calls == batches * 6


def test_chat_data_prepares_into_prompts_and_answers(tmp_path):
    from shardtune.data.prepare import prepare_dataset
    from shardtune.data.shards import PreparedSource
    from shardtune.data.synthetic_chat import SYSTEM_PROMPT, generate_conversations, write_jsonl
    from shardtune.data.tokenizer import load_tokenizer

    records = generate_conversations(200, seed=3)
    assert all(r["messages"][0] == {"role": "system", "content": SYSTEM_PROMPT} for r in records)
    assert any(len(r["messages"]) == 5 for r in records)  # some conversations have two turns
    data = write_jsonl(tmp_path / "chat.jsonl", records)
    settings = PrepareSection(format="chat", progress=False, splits={"train": 0.8, "validation": 0.2, "test": 0.0})
    prepare_dataset(settings, tmp_path / "prepared", inputs=[str(data)], tokenizer_vocab_size=400)
    tokenizer = load_tokenizer(SimpleNamespace(name_or_path=str(tmp_path / "prepared" / "tokenizer")), False)
    source = PreparedSource(tmp_path / "prepared", "validation", 64, 0)
    samples = generation_samples(source, 8, max_prompt_tokens=200)
    answers = {r["messages"][-1]["content"] for r in records}
    assert len(samples) == 8
    for s in samples:
        prompt = tokenizer.decode(s.prompt, skip_special_tokens=True)
        assert prompt.startswith("<|system|>\n" + SYSTEM_PROMPT) and prompt.endswith("<|assistant|>\n")
        # The answer is the last assistant turn only: its reply, then the end-of-turn token.
        assert s.answer[-2] == tokenizer.eos_token_id or s.answer[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(s.answer, skip_special_tokens=True).strip() in answers


@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_exact_match_on_two_ranks_with_uneven_shares(tmp_path, strategy):
    run = run_shardtune(tmp_path, f"distributed.strategy={strategy}", "train.max_steps=2", "data.prepare.splits={train: 0.9, validation: 0.05, test: 0.05}",
                        "eval.generate.samples=5", "eval.generate.max_new_tokens=4", "eval.generate.micro_batch_size=2",
                        "eval.generate.examples=2", nproc=2, timeout=240)
    result = run.result
    for part in ("baseline", "final", "test"):
        assert 0.0 <= result[part]["exact_match"] <= 1.0 and result[part]["generated"] == 5
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    shown = [r["generations"] for r in records if r["kind"] in ("val", "test") and "generations" in r]
    assert len(shown) == 3 and all(len(g) == 2 and {"prompt", "reference", "generated", "match"} <= set(g[0])
                                   for g in shown)
    # A synthetic prompt ends where its completion starts; the reference is that completion.
    assert shown[0][0]["prompt"].endswith("\n") and shown[0][0]["reference"]
