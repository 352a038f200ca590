"""Generated-answer metrics (token F1 as SQuAD scores it, ROUGE-L), ties in the selection metric
broken by validation loss, and ``shardtune generate`` on the real pre-trained chat model."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
from conftest import ROOT, run_env

from shardtune.eval.generate import answer_scores, answer_tokens
from shardtune.eval.metrics import lcs_length, rouge_l, token_f1
from shardtune.eval.tracker import EvalTracker


def test_answer_tokens_follow_squad_normalisation():
    assert answer_tokens("The  Cat, sat on a MAT!") == ["cat", "sat", "on", "mat"]
    assert answer_tokens("  ") == []


@pytest.mark.parametrize("prediction, reference, f1, rouge", [
    ("the cat sat on the mat", "the cat is on the mat", 0.75, 0.75),
    # Same bag of words, reversed order: token F1 ignores order, ROUGE-L does not.
    ("mat on cat", "cat on mat", 1.0, 1 / 3),
    ("billing", "billing", 1.0, 1.0),
    ("The category is billing.", "billing", 2 * (1 / 3) / (1 / 3 + 1), 2 * (1 / 3) / (1 / 3 + 1)),
    ("shipping", "billing", 0.0, 0.0),
    ("", "billing", 0.0, 0.0),
    ("", "", 1.0, 1.0),
    # Repeated words count once each side (multiset overlap), LCS uses each once.
    ("x y y y", "y y z", 2 * 0.5 * (2 / 3) / (0.5 + 2 / 3), 2 * 0.5 * (2 / 3) / (0.5 + 2 / 3)),
])
def test_token_f1_and_rouge_l(prediction, reference, f1, rouge):
    scores = answer_scores(prediction, reference)
    assert scores["token_f1"] == pytest.approx(f1)
    assert scores["rouge_l"] == pytest.approx(rouge)
    assert scores["exact_match"] == float(prediction.strip(". ").lower() == reference)


def test_lcs_against_brute_force():
    import itertools
    import random

    rng = random.Random(0)
    for _ in range(200):
        a = [rng.choice("abc") for _ in range(rng.randint(0, 6))]
        b = [rng.choice("abc") for _ in range(rng.randint(0, 6))]
        best = 0
        for k in range(len(a), 0, -1):
            if any(_is_subsequence(sub, b) for sub in itertools.combinations(a, k)):
                best = k
                break
        assert lcs_length(a, b) == best, (a, b)
    assert token_f1(["x"], []) == 0.0 and rouge_l([], ["x"]) == 0.0


def _is_subsequence(sub, seq) -> bool:
    it = iter(seq)
    return all(x in it for x in sub)


def _tracker(metric: str, mode: str, best: dict | None) -> EvalTracker:
    tracker = EvalTracker.__new__(EvalTracker)  # only the decision under test, no run around it
    tracker.cfg = SimpleNamespace(eval=SimpleNamespace(min_delta=0.0))
    tracker.metric, tracker.mode, tracker.best = metric, mode, best
    return tracker


def test_ties_in_the_selection_metric_go_to_the_lower_validation_loss():
    tracker = _tracker("exact_match", "max", {"exact_match": 0.75, "loss": 0.40})
    assert tracker._better({"exact_match": 0.75, "loss": 0.35})
    assert not tracker._better({"exact_match": 0.75, "loss": 0.45})
    assert not tracker._better({"exact_match": 0.70, "loss": 0.10})
    assert tracker._better({"exact_match": 0.80, "loss": 0.90})
    # loss itself has nothing to break ties with: equal is not better.
    assert not _tracker("loss", "min", {"loss": 0.4})._better({"loss": 0.4})


@pytest.mark.slow
def test_generate_command_answers_with_the_chat_template(smollm2_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "shardtune", "generate", str(smollm2_dir), "--max-new-tokens", "12",
         "--prompt", "What is the capital of France? Answer in one word.", "--chat"],
        cwd=ROOT, env=run_env(), input="What is the capital of Italy? Answer in one word.\n", capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, second = proc.stdout.strip().splitlines()[-2:]
    assert "Paris" in first, proc.stdout
    # The --chat loop reads stdin and answers each line (the conversation so far in its prompt).
    assert "Rome" in second, proc.stdout
