"""Tests of colm.datasets.metrics against hand-computed values."""

import pytest
import torch

from colm.datasets.metrics import METRICS, Scorer, compute_metrics


def test_accuracy_full_precision():
    assert compute_metrics(["accuracy"], predictions=[0, 1, 2, 1], labels=[0, 1, 1, 1]) == {"accuracy": 0.75}
    value = compute_metrics(["accuracy"], predictions=[0, 1, 1], labels=[0, 0, 0])["accuracy"]
    assert abs(value - 1 / 3) < 1e-12


def test_exact_match_strips_and_uses_first_reference():
    got = compute_metrics(
        ["exact_match"],
        output_texts=[" Paris ", "london", "b"],
        references=[["Paris"], ["London"], ["a", "b"]],
    )
    assert abs(got["exact_match"] - 1 / 3) < 1e-12


def test_rouge_l_by_hand():
    # "the cat sat" vs "the cat sat down": LCS 3, P = 3/3, R = 3/4, F = 2PR/(P+R) = 6/7.
    # "a b c d" vs "a x c y": LCS 2 (a, c), P = R = 1/2, F = 1/2.
    # The best reference counts, so the unrelated "dog" does not lower the first score.
    got = compute_metrics(
        ["rouge"],
        output_texts=["the cat sat", "a b c d"],
        references=[["dog", "the cat sat down"], ["a x c y"]],
    )
    assert list(got) == ["rougeL"]
    assert abs(got["rougeL"] - (6 / 7 + 1 / 2) / 2) < 1e-9


def test_multiple_answer_metrics():
    got = compute_metrics(
        ["exact_match_multiple_ans", "accuracy_multiple_ans"],
        predictions=[1, 2, 0],
        multi_labels=[[0, 1], [0], [0]],
        output_texts=["b ", "z", "c"],
        references=[["a", "b"], ["c"], ["c", "d"]],
    )
    assert abs(got["exact_match_multiple_ans"] - 2 / 3) < 1e-12
    assert abs(got["accuracy_multiple_ans"] - 2 / 3) < 1e-12


def test_errors():
    with pytest.raises(ValueError, match="'bleu'.*accuracy"):
        compute_metrics(["bleu"], predictions=[0], labels=[0])
    with pytest.raises(ValueError, match="missing \\['labels'\\]"):
        compute_metrics(["accuracy"], predictions=[0])
    with pytest.raises(ValueError, match="equally long"):
        compute_metrics(["accuracy"], predictions=[0, 1], labels=[0])
    with pytest.raises(ValueError, match="non-empty"):
        compute_metrics(["accuracy"], predictions=[], labels=[])


def test_scorer_accumulates_batches():
    scorer = Scorer(["accuracy", "exact_match"])
    scorer.add(
        predictions=torch.tensor([1, 0]),
        labels=torch.tensor([1, 1]),
        output_texts=["x", "y"],
        references=[["x"], ["x"]],
    )
    scorer.add_batch(predictions=[2], labels=[2], output_texts=["z"], references=[["z"]], multi_labels=[None])
    got = scorer.compute()
    assert abs(got["accuracy"] - 2 / 3) < 1e-12 and abs(got["exact_match"] - 2 / 3) < 1e-12
    assert scorer.seen["multi_labels"] == []
    assert Scorer(["rouge"]).metric_names == ["rougeL"]
    with pytest.raises(ValueError, match="Unknown metric"):
        Scorer(["f1"])


def test_registry_names():
    assert set(METRICS) == {"accuracy", "exact_match", "rougeL", "exact_match_multiple_ans", "accuracy_multiple_ans"}
