"""Evaluation: metrics equal scikit-learn's, uneven shards finish, rank 0 writes each tag once,
evaluation leaves training untouched, early stopping stops every rank at the same step."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import ROOT, run_shardtune

from shardtune.eval.metrics import classification_metrics, language_model_metrics

TINY_CLASSIFY = ROOT / "tests" / "configs" / "tiny-classify.yaml"
LABELS = ["a", "b", "c", "d"]


def _sklearn(y_true, y_pred):
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=range(4), average="macro", zero_division=0)
    pc, rc, fc, _ = precision_recall_fscore_support(y_true, y_pred, labels=range(4), average=None, zero_division=0)
    return accuracy_score(y_true, y_pred), (p, r, f), (pc, rc, fc)


def test_classification_metrics_match_sklearn():
    from sklearn.metrics import confusion_matrix

    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 4, 200)
    y_pred = np.where(rng.random(200) < 0.6, y_true, rng.integers(0, 3, 200))  # class 3 under-predicted
    y_pred[y_pred == 3] = 2  # and never predicted at all: precision 0 by convention
    confusion = confusion_matrix(y_true, y_pred, labels=range(4))
    ours = classification_metrics(confusion, LABELS)
    acc, macro, per_class = _sklearn(y_true, y_pred)
    assert ours["accuracy"] == pytest.approx(acc)
    assert [ours["precision_macro"], ours["recall_macro"], ours["f1_macro"]] == pytest.approx(list(macro))
    for i, name in enumerate(LABELS):
        assert ours[f"precision/{name}"] == pytest.approx(per_class[0][i])
        assert ours[f"recall/{name}"] == pytest.approx(per_class[1][i])
        assert ours[f"f1/{name}"] == pytest.approx(per_class[2][i])


class _FixedClassifier(torch.nn.Module):
    """Logits that predict a fixed label per row (stored in input_ids[:, 0])."""

    def forward(self, input_ids, attention_mask):
        from types import SimpleNamespace

        return SimpleNamespace(logits=torch.nn.functional.one_hot(input_ids[:, 0], 4).float() * 5)


class _Runner:
    def __init__(self, model):
        from types import SimpleNamespace

        self.model, self.ctx = model, SimpleNamespace(device=torch.device("cpu"))

    def train(self, mode=True):
        self.model.train(mode)

    def autocast(self):
        import contextlib

        return contextlib.nullcontext()


def test_evaluate_reduces_a_confusion_matrix_equal_to_sklearn(single_process_group):
    from sklearn.metrics import confusion_matrix, f1_score

    from shardtune.data.labelled import ClassificationSource, LabelledExamples
    from shardtune.eval.evaluate import evaluate
    from shardtune.tasks import ClassificationTask

    rng = np.random.default_rng(1)
    y_true = rng.integers(0, 4, 37)  # not a multiple of the micro-batch: a partial last batch
    y_pred = np.where(rng.random(37) < 0.7, y_true, rng.integers(0, 4, 37))
    examples = LabelledExamples(np.stack([y_pred, y_pred], 1), np.ones((37, 2), np.int64), y_true)
    metrics = evaluate(_Runner(_FixedClassifier()), ClassificationTask(4), ClassificationSource(examples, 0, False).epoch(0),
                       micro_batch_size=5, rank=0, world_size=1, label_names=LABELS)
    assert metrics["confusion"] == confusion_matrix(y_true, y_pred, labels=range(4)).tolist()
    assert metrics["f1_macro"] == pytest.approx(f1_score(y_true, y_pred, average="macro", zero_division=0))
    assert metrics["examples"] == 37


def test_validation_that_scores_no_token_is_nan_not_a_perfect_zero():
    # Every assistant turn past data.seq_len leaves nothing to score: 0/0 must not read as loss 0.
    empty = language_model_metrics(0.0, 0.0, 0.0)
    assert math.isnan(empty["loss"]) and math.isnan(empty["perplexity"]) and math.isnan(empty["token_accuracy"])
    assert empty["tokens"] == 0
    scored = language_model_metrics(6.0, 3.0, 1.0)
    assert scored["loss"] == 2.0 and scored["token_accuracy"] == pytest.approx(1 / 3) and scored["tokens"] == 3.0


def _events(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = list((run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    assert len(files) == 1, files  # rank 0 alone writes
    acc = EventAccumulator(str(files[0]), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


# Dropout on (with per-rank streams): evaluation drawing from any RNG would change training.
COMMON = ("train.max_steps=4", "train.micro_batch_size=4", "checkpoint.at_end=false", "finetune.dropout=0.2")


@pytest.fixture(scope="module")
def uneven_runs(tmp_path_factory):
    """The same classification run on 1 rank and on 2 ranks (FSDP2) with an odd validation split."""
    one = run_shardtune(tmp_path_factory.mktemp("one"), *COMMON, "eval.every=2", config=TINY_CLASSIFY)
    two = run_shardtune(tmp_path_factory.mktemp("two"), *COMMON, "eval.every=2", "distributed.strategy=fsdp",
                        config=TINY_CLASSIFY, nproc=2, timeout=240)
    return one, two


@pytest.mark.distributed
def test_uneven_validation_shards_on_two_ranks_finish_with_the_same_metrics(uneven_runs):
    one, two = uneven_runs
    val_one, val_two = one.metrics("val"), two.metrics("val")
    examples = val_two[0]["examples"]
    assert examples % 8, "the split should not divide evenly into 2 ranks x 4 rows"
    assert [r["step"] for r in val_two] == [0, 2, 4]
    # Before training both hold the same weights: every row counted once, no dummy row counted.
    assert val_one[0]["confusion"] == val_two[0]["confusion"]
    assert val_one[0]["loss"] == pytest.approx(val_two[0]["loss"], rel=1e-5)
    for a, b in zip(val_one, val_two, strict=True):
        assert a["examples"] == b["examples"] == examples == sum(map(sum, b["confusion"]))


@pytest.mark.distributed
def test_tensorboard_has_baseline_val_and_test_tags_written_once(uneven_runs):
    _, two = uneven_runs
    acc = _events(two.out_dir)
    tags = set(acc.Tags()["scalars"])
    for metric in ("loss", "accuracy", "f1_macro", "precision_macro", "recall_macro", "f1/sports"):
        assert {f"baseline/{metric}", f"val/{metric}", f"test/{metric}"} <= tags, metric
    assert [e.step for e in acc.Scalars("baseline/f1_macro")] == [0]
    assert [e.step for e in acc.Scalars("val/f1_macro")] == [0, 2, 4]
    assert [e.step for e in acc.Scalars("test/f1_macro")] == [4]
    assert acc.Scalars("baseline/accuracy")[0].value == pytest.approx(acc.Scalars("val/accuracy")[0].value)
    result = two.result
    assert result["test"]["f1_macro"] == pytest.approx(acc.Scalars("test/f1_macro")[0].value, rel=1e-6)
    assert result["baseline"]["accuracy"] == pytest.approx(acc.Scalars("baseline/accuracy")[0].value, rel=1e-6)
    assert two.stdout.count("finished: 4 steps") == 1


@pytest.mark.distributed
def test_evaluation_changes_neither_rng_nor_data_cursor(tmp_path, uneven_runs):
    one, _ = uneven_runs  # evaluated at steps 0, 2, 4
    often = run_shardtune(tmp_path, *COMMON, "eval.every=1", config=TINY_CLASSIFY)
    assert len(often.metrics("val")) == 5 and len(one.metrics("val")) == 3
    assert often.train_losses() == one.train_losses()


def test_causal_lm_metrics_and_early_stopping(tmp_path):
    # min_delta larger than any possible change: the first evaluation after the baseline is
    # never an improvement, so patience 1 stops there.
    run = run_shardtune(tmp_path, "eval.every=2", "eval.patience=1", "eval.min_delta=100",
                        "data.prepare.splits={train: 0.9, validation: 0.05, test: 0.05}", "train.max_steps=20")
    result = run.result
    assert result["steps"] == 4 and result["stopped_reason"].startswith("early stopping at step 4")
    assert result["best_step"] == 2
    val = run.metrics("val")
    assert [r["step"] for r in val] == [0, 2, 4]
    for r in val:
        assert r["perplexity"] == pytest.approx(np.exp(r["loss"]))
        assert 0.0 <= r["token_accuracy"] <= 1.0
    # The test split is scored once, with the best (step 2) checkpoint's weights.
    test = run.metrics("test")
    assert len(test) == 1 and result["test"]["loss"] == pytest.approx(test[0]["loss"])
    assert json.loads((tmp_path / "result.json").read_text())["best_checkpoint"].endswith("step-00000002")
