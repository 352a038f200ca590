"""Preference tuning in one process: the DPO/IPO arithmetic by hand, rating-to-pair conversion,
the hosted fine-tuning formats and prepared pair documents."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from shardtune.config import PrepareSection
from shardtune.data.preference import RatingsTally, pair_ratings, parse_preference
from shardtune.data.preference_source import PreferenceSource
from shardtune.data.records import BadRecord, RecordRules
from shardtune.preference import PreferenceTask, dpo_loss, response_logps

LN2, LN3 = math.log(2.0), math.log(3.0)


def test_response_logps_and_dpo_loss_by_hand():
    # Vocabulary of 3; logits (0, ln 2, ln 3) give probabilities (1/6, 2/6, 3/6) at every position.
    logits = torch.tensor([0.0, LN2, LN3]).expand(2, 4, 3).clone()
    labels = torch.tensor([[-100, -100, 2, 1],    # targets at positions 2, 3: log(3/6) + log(2/6)
                           [-100, 0, -100, -100]])  # one target: log(1/6)
    logps, counts = response_logps(logits, labels)
    assert logps.tolist() == pytest.approx([math.log(0.5) + math.log(1 / 3), math.log(1 / 6)], abs=1e-6)
    assert counts.tolist() == [2, 1]

    # Policy (chosen -10, rejected -12), reference (-11, -11): h = 1 - (-1) = 2; beta 0.1.
    task = PreferenceTask("dpo", beta=0.1)
    loss, h = task.losses(torch.tensor([[-10.0, -12.0]]), torch.tensor([[4, 2]]), torch.tensor([[-11.0, -11.0]]))
    assert float(h) == pytest.approx(2.0)
    assert float(loss) == pytest.approx(math.log(1 + math.exp(-0.2)), abs=1e-12)  # -log sigmoid(0.2)
    # Label smoothing 0.1: 0.9 softplus(-0.2) + 0.1 softplus(0.2) = softplus(-0.2) + 0.1 * 0.2.
    smoothed, _ = PreferenceTask("dpo", 0.1, 0.1).losses(torch.tensor([[-10.0, -12.0]]), torch.tensor([[4, 2]]),
                                                          torch.tensor([[-11.0, -11.0]]))
    assert float(smoothed) == pytest.approx(math.log(1 + math.exp(-0.2)) + 0.02, abs=1e-12)
    # IPO on per-token log-ratios: h = 1/4 - (-1/2) = 0.75; (0.75 - 1/(2*0.1))^2 = 18.0625.
    ipo, _ = PreferenceTask("ipo", 0.1).losses(torch.tensor([[-10.0, -12.0]]), torch.tensor([[4, 2]]),
                                               torch.tensor([[-11.0, -11.0]]))
    assert float(ipo) == pytest.approx(18.0625)
    # At the start policy == reference: h = 0 and the DPO loss is log 2 for every pair.
    assert float(dpo_loss(torch.zeros(()), 0.5)) == pytest.approx(LN2)


def test_reward_accuracy_and_margin_on_a_constructed_case():
    task = PreferenceTask("dpo", beta=0.5)
    # Three pairs, each row a 2-token sequence whose one target has a chosen log-prob.
    # Pair log-probs (chosen, rejected): (-1, -3), (-2, -1), (-1, -1.5); reference all (-2, -2).
    want = torch.tensor([[-1.0, -3.0], [-2.0, -1.0], [-1.0, -1.5]])
    logits = torch.full((6, 2, 2), -1e4)
    logits[:, 0, 0] = 0.0
    logits[:, 0, 1] = torch.log(torch.expm1(-want.flatten()))  # p(target 0) = exp(logp) exactly
    batch = {"input_ids": torch.zeros(3, 2, 2, dtype=torch.long),
             "labels": torch.tensor([[-100, 0]]).expand(3, 2, 2).clone(),
             "lengths": torch.full((3, 2), 2), "ref_logps": torch.full((3, 2), -2.0)}
    stats = task.eval_stats(logits, batch, torch.device("cpu"))
    metrics = task.metrics_from_sums(stats)
    # Rewards 0.5 * (logp + 2): margins 1.0, -0.5, 0.25 -> accuracy 2/3, mean margin 0.25.
    assert metrics["reward_accuracy"] == pytest.approx(2 / 3)
    assert metrics["reward_margin"] == pytest.approx(0.25, abs=1e-6)
    assert metrics["chosen_logp"] == pytest.approx(-4 / 3, abs=1e-6)
    assert metrics["logp_accuracy"] == pytest.approx(2 / 3)
    h = torch.tensor([2.0, -1.0, 0.5])
    assert metrics["loss"] == pytest.approx(float(dpo_loss(h, 0.5).mean()), abs=1e-6)


RULES = RecordRules()


def _ratings(*rows):
    return [(f"r.jsonl:{i + 1}", row) for i, row in enumerate(rows)]


def test_ratings_become_pairs_with_ties_singles_and_corrections():
    items = _ratings(
        {"prompt": "2+2?", "response": "4", "rating": 5},
        {"prompt": "2+2?", "response": "5", "rating": 1},
        {"prompt": "2+2?", "response": "four", "rating": 5},  # ties "4": no pair between them
        {"prompt": "capital?", "response": "Paris", "rating": 3},  # alone: dropped
        {"prompt": "tie?", "response": "a", "rating": 2},
        {"prompt": "tie?", "response": "b", "rating": 2},  # all tied: both dropped
        {"prompt": "fix?", "response": "wrong", "rating": 0, "correction": "right"},  # alone, corrected
        {"prompt": "2+2?", "response": "5", "rating": "bad"},  # not a number
        {"text": "not a rating"},  # passes through untouched
    )
    tally = RatingsTally()
    out = list(pair_ratings(items, RULES, tally))
    # Other records and invalid ratings come out at once; pairs after the file's last record.
    assert out[:2] == [("r.jsonl:8", out[0][1]), ("r.jsonl:9", {"text": "not a rating"})]
    pairs = {loc: raw for loc, raw in out if isinstance(raw, dict) and "chosen" in raw}
    drops = {loc: raw.reason for loc, raw in out if isinstance(raw, BadRecord)}
    assert pairs == {
        "r.jsonl:1>r.jsonl:2": {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
        "r.jsonl:3>r.jsonl:2": {"prompt": "2+2?", "chosen": "four", "rejected": "5"},
        "r.jsonl:7(correction)>r.jsonl:7": {"prompt": "fix?", "chosen": "right", "rejected": "wrong"},
    }
    assert drops == {"r.jsonl:4": "single_response", "r.jsonl:5": "tied_ratings", "r.jsonl:6": "tied_ratings",
                     "r.jsonl:8": "wrong_type"}
    summary = tally.to_dict()
    assert summary["ratings_read"] == 8 and summary["ratings_paired"] == 4
    assert summary["ratings_dropped_by_reason"] == {"single_response": 1, "tied_ratings": 2, "wrong_type": 1}
    assert summary["pairs_from_ratings"] == 2 and summary["pairs_from_corrections"] == 1


def test_pair_formats_parse_to_the_same_record():
    messages = [{"role": "user", "content": "Hi?"}]
    hosted = {"input": {"messages": messages},
              "preferred_output": [{"role": "assistant", "content": "Hello."}],
              "non_preferred_output": [{"role": "assistant", "content": "Go away."}]}
    plain = {"messages": messages, "chosen": "Hello.", "rejected": "Go away."}
    a, b = parse_preference(hosted, "a:1", RULES), parse_preference(plain, "b:1", RULES)
    assert a.content() == b.content() and a.content_digest() == b.content_digest()
    # Another pair of the same prompt: another record, the same split key (bytes 8-16).
    other = parse_preference({**plain, "rejected": "No."}, "c:1", RULES)
    assert other.content_digest()[:8] != a.content_digest()[:8]
    assert other.content_digest()[8:] == a.content_digest()[8:]
    with pytest.raises(BadRecord) as bad:
        parse_preference({**plain, "rejected": "Hello."}, "d:1", RULES)
    assert bad.value.reason == "identical_responses"
    with pytest.raises(BadRecord) as bad:
        parse_preference({**hosted, "preferred_output": [{"role": "user", "content": "x"}]}, "e:1", RULES)
    assert bad.value.reason == "wrong_type"


def _prepare(tmp_path, records, **settings):
    from shardtune.data.prepare import prepare_dataset

    path = tmp_path / "feedback.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    settings = {"splits": {"train": 0.5, "validation": 0.5, "test": 0.0}, **settings}
    cfg = PrepareSection(format="preference", progress=False, **settings)
    return prepare_dataset(cfg, tmp_path / "prepared", inputs=[str(path)], tokenizer_vocab_size=300)


def test_prepared_pairs_share_prompt_tokens_and_account_for_every_record(tmp_path):
    from shardtune.data.shards import open_corpus

    records = [{"prompt": f"Add {i} and {i}.", "chosen": str(2 * i), "rejected": str(2 * i + 1)} for i in range(40)]
    records += [{"messages": [{"role": "user", "content": f"Name {i}?"}],
                 "chosen": [{"role": "assistant", "content": f"Item {i}."}], "rejected": "No idea."}
                for i in range(40)]
    records += [{"prompt": "Say hi.", "response": r, "rating": s} for r, s in (("hi", 2), ("bye", 0), ("yo", 1))]
    records += [{"prompt": "Lonely?", "response": "yes", "rating": 1}, records[0], {"prompt": "x", "chosen": 3}]
    result = _prepare(tmp_path, records)
    report = result.report
    # 80 pairs + 3 from the ratings of "Say hi." + 2 drops (single response, wrong type) + the duplicate.
    assert report["records_read"] == 80 + 3 + 1 + 1 + 1
    assert report["records_kept"] == 83
    assert report["dropped_by_reason"] == {"exact_duplicate": 1, "single_response": 1, "wrong_type": 1}
    ratings = json.loads((result.out_dir / "ratings.json").read_text())
    assert ratings["ratings_read"] == 4 and ratings["ratings_paired"] == 3 and ratings["pairs_from_ratings"] == 3

    manifest = result.manifest
    kept = 0
    for split in ("train", "validation"):
        corpus = open_corpus(result.out_dir, manifest, split)
        source = PreferenceSource(corpus, seq_len=64, seed=0, where=split)
        kept += len(source)
        for i in range(len(source)):
            pair = source.pair(i)
            p = int(np.argmax(pair["labels"][0] != -100))
            assert p == int(np.argmax(pair["labels"][1] != -100))  # the same prompt length
            assert (pair["input_ids"][0, :p] == pair["input_ids"][1, :p]).all()  # the same prompt tokens
            assert not (pair["input_ids"][0, p:pair["lengths"][0]] == pair["input_ids"][1, p:pair["lengths"][0]]).all()
    assert kept == 83


def test_truncation_and_drops_are_counted(tmp_path):
    from shardtune.data.shards import open_corpus

    long_prompt = " ".join(["word"] * 80)
    records = [{"prompt": long_prompt, "chosen": "a", "rejected": "b"},
               {"prompt": "short", "chosen": " ".join(["yes"] * 60), "rejected": "no"}]
    result = _prepare(tmp_path, records, splits={"train": 1.0, "validation": 0.0, "test": 0.0})
    source = PreferenceSource(open_corpus(result.out_dir, result.manifest, "train"), seq_len=32, seed=0)
    assert source.stats() == {"documents": 2, "pairs": 1, "dropped_pairs": 1, "truncated_pairs": 1, "seq_len": 32}
    pair = source.pair(0)
    assert pair["lengths"].tolist()[0] == 32 and pair["lengths"][1] < 32


def test_chat_weight_zero_keeps_the_message_as_context_only(tmp_path):
    from shardtune.data.encoder import BUILTIN_CHAT_TEMPLATE, DocumentEncoder
    from shardtune.data.records import parse_record
    from shardtune.data.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(["Hi there. Hello, how are you? Fine, thanks."] * 20, 300, tmp_path / "tok")
    turns = [{"role": "user", "content": "Hi there."}, {"role": "assistant", "content": "Hello, how are you?"},
             {"role": "user", "content": "Fine?"}, {"role": "assistant", "content": "Fine, thanks."}]
    weighted = [dict(m) for m in turns]
    weighted[1]["weight"] = 0
    weighted[3]["weight"] = 1
    encoder = DocumentEncoder(tokenizer, BUILTIN_CHAT_TEMPLATE)
    plain, zero = encoder.encode([parse_record({"messages": turns}, "a:1", RULES),
                                  parse_record({"messages": weighted}, "a:2", RULES)])
    assert (plain[0] == zero[0]).all()  # the same tokens: the message stays as context
    first_reply = len(tokenizer("Hello, how are you?", add_special_tokens=False)["input_ids"])
    assert plain[1].sum() - zero[1].sum() >= first_reply  # ... but out of the loss
    assert zero[1][-3:].all()  # the weight-1 reply still is in it
    with pytest.raises(BadRecord) as bad:
        parse_record({"messages": [{**turns[0], "weight": 0}, turns[1]]}, "a:3", RULES)
    assert bad.value.reason == "wrong_type"
    only_context = [turns[0], {**turns[1], "weight": 0}]
    with pytest.raises(BadRecord) as bad:
        parse_record({"messages": only_context}, "a:4", RULES)
    assert bad.value.reason == "no_assistant_turn"


def test_lora_reference_is_the_base_with_adapters_disabled(single_process_group):
    import contextlib

    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from shardtune.preference import reference_logps

    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=2, vocab_size=50)
    base = AutoModelForCausalLM.from_config(config)
    pairs = []
    for i in range(3):
        ids = torch.randint(0, 50, (2, 12)).numpy()
        labels = ids.copy()
        labels[:, :4] = -100
        pairs.append({"input_ids": ids, "labels": labels, "lengths": np.array([12, 9 + i])})
    task = PreferenceTask()

    class Runner:
        def __init__(self, model):
            self.model, self.ctx = model, type("Ctx", (), {"device": torch.device("cpu")})()

        def train(self, mode=True):
            self.model.train(mode)

        def autocast(self):
            return contextlib.nullcontext()

    want = reference_logps(Runner(base), task, pairs, micro_batch_size=2, rank=0, world_size=1)
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # trained adapters: the policy is no longer the base
    got = reference_logps(Runner(peft), task, pairs, micro_batch_size=2, rank=0, world_size=1)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    with torch.no_grad():
        batch = {k: torch.from_numpy(np.stack([p[k] for p in pairs])) for k in ("input_ids", "labels", "lengths")}
        adapted, _ = task.pair_logps(task.logits(peft.eval(), batch, torch.device("cpu")), batch, torch.device("cpu"))
    assert np.abs(adapted.numpy() - want).max() > 1e-3
