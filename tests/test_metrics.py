"""Tests of colm.datasets.metrics against hand-computed values."""

import math
import sys
import types

import pytest
import torch

from colm.datasets import metrics
from colm.datasets.metrics import METRICS, Scorer, canonical_name, compute_metrics, normalize_squad_answer, tokenize_13a


def close(a, b):
    return abs(a - b) < 1e-9


# ---- classification ----------------------------------------------------------------------------------


def test_accuracy_full_precision():
    assert compute_metrics(["accuracy"], predictions=[0, 1, 2, 1], labels=[0, 1, 1, 1]) == {"accuracy": 0.75}
    value = compute_metrics(["accuracy"], predictions=[0, 1, 1], labels=[0, 0, 0])["accuracy"]
    assert abs(value - 1 / 3) < 1e-12


def test_matthews_and_f1_from_the_2x2_table():
    # index:       0  1  2  3  4  5  6  7
    predictions = [1, 1, 1, 0, 0, 0, 1, 0]
    labels = [1, 1, 0, 0, 0, 1, 1, 0]
    # TP = {0, 1, 6} = 3, FP = {2} = 1, FN = {5} = 1, TN = {3, 4, 7} = 3.
    # MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (9 - 1) / sqrt(4*4*4*4) = 8/16.
    # F1 = 2TP / (2TP + FP + FN) = 6 / 8.
    got = compute_metrics(["matthews_correlation", "f1"], predictions=predictions, labels=labels)
    assert close(got["matthews_correlation"], 0.5) and close(got["f1"], 0.75)
    # F1 is of class 1 only: predictions all 1 on labels [1, 0, 0]: TP 1, FP 2, FN 0 -> 2/4
    # (class 0 would score 0: it is never predicted); with no TP at all F1 is 0.
    assert close(compute_metrics(["f1"], predictions=[1, 1, 1], labels=[1, 0, 0])["f1"], 0.5)
    assert compute_metrics(["f1"], predictions=[1, 1, 1], labels=[0, 0, 0])["f1"] == 0.0


def test_matthews_multiclass_and_degenerate():
    # predictions [0, 1, 2, 0], labels [0, 1, 1, 2]: correct c = 2, total s = 4,
    # true counts t = [1, 2, 1], predicted counts p = [2, 1, 1]; t.p = 5, p.p = 6, t.t = 6.
    # MCC = (c*s - t.p) / sqrt((s^2 - p.p)(s^2 - t.t)) = (8 - 5) / sqrt(10 * 10) = 0.3.
    got = compute_metrics(["matthews_correlation"], predictions=[0, 1, 2, 0], labels=[0, 1, 1, 2])
    assert close(got["matthews_correlation"], 0.3)
    # Perfectly anti-correlated binary predictions give -1; constant predictions leave it undefined -> 0.
    assert close(metrics.matthews_correlation([1, 0, 1, 0], [0, 1, 0, 1]), -1.0)
    assert metrics.matthews_correlation([1, 1, 1], [0, 1, 0]) == 0.0


def test_f1_rejects_non_binary_choices():
    with pytest.raises(ValueError, match=r"binary F1.*\[2\]"):
        compute_metrics(["f1"], predictions=[0, 2], labels=[0, 1])


def test_pearson_and_spearman_on_choice_indices():
    # x = [0, 1, 2, 3], y = [0, 2, 1, 3]: deviations from 1.5 are (-1.5, -.5, .5, 1.5) and (-1.5, .5, -.5, 1.5),
    # sum of products 2.25 - .25 - .25 + 2.25 = 4, sums of squares 5 and 5 -> r = 4/5; ranks = values -> rho = 4/5.
    got = compute_metrics(["pearsonr", "spearmanr"], predictions=[0, 1, 2, 3], labels=[0, 2, 1, 3])
    assert close(got["pearsonr"], 0.8) and close(got["spearmanr"], 0.8)
    # y = [0, 1, 2, 10]: monotone in x, so rho = 1; Pearson: dy = (-3.25, -2.25, -1.25, 6.75),
    # sum dx*dy = 4.875 + 1.125 - .625 + 10.125 = 15.5, sum dy^2 = 62.75 -> r = 15.5 / sqrt(5 * 62.75).
    got = compute_metrics(["pearsonr", "spearmanr"], predictions=[0, 1, 2, 3], labels=[0, 1, 2, 10])
    assert close(got["pearsonr"], 15.5 / math.sqrt(5 * 62.75)) and close(got["spearmanr"], 1.0)
    # Ties get average ranks: x = [1, 1, 2, 3] -> ranks (1.5, 1.5, 3, 4), deviations (-1, -1, .5, 1.5);
    # y ranks (1, 2, 3, 4), deviations (-1.5, -.5, .5, 1.5): sum 4.5, squares 4.5 and 5 -> rho = sqrt(0.9).
    assert close(metrics.spearmanr([1, 1, 2, 3], [1, 2, 3, 4]), math.sqrt(0.9))
    with pytest.warns(UserWarning, match="constant"):
        assert metrics.pearsonr([2, 2, 2], [0, 1, 2]) == 0.0


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


# ---- generation ------------------------------------------------------------------------------------------


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


def test_tokenize_13a():
    # Punctuation and symbols are split off; periods and commas stay inside numbers; a dash after a digit splits.
    assert tokenize_13a("Hello, world! It costs 3.5 dollars.") == [
        "Hello", ",", "world", "!", "It", "costs", "3.5", "dollars", "."
    ]
    assert tokenize_13a("well-known 1-2 don't") == ["well-known", "1", "-", "2", "don't"]
    assert tokenize_13a("a&amp;b (x)") == ["a", "&", "b", "(", "x", ")"]


def test_bleu_by_hand():
    # Output "the cat sat on the mat today" (7 tokens) vs "the cat sat on the mat" (6 tokens):
    #   1-grams: the x2, cat, sat, on, mat match, "today" not        -> p1 = 6/7
    #   2-grams: 5 of 6 match (all but "mat today")                 -> p2 = 5/6
    #   3-grams: 4 of 5, 4-grams: 3 of 4                             -> p3 = 4/5, p4 = 3/4
    #   c = 7 > r = 6, so the brevity penalty is 1.
    #   BLEU = (6/7 * 5/6 * 4/5 * 3/4) ** (1/4) = (3/7) ** (1/4).
    got = compute_metrics(["bleu"], output_texts=["the cat sat on the mat today"], references=[["the cat sat on the mat"]])
    assert list(got) == ["bleu"] and close(got["bleu"], (3 / 7) ** 0.25)


def test_bleu_brevity_penalty_corpus_level():
    # Two examples, precisions summed over the corpus:
    #   "the cat sat on" vs "the cat sat on the mat": matches 4/4, 3/3, 2/2, 1/1; c = 4, r = 6.
    #   "a b c d e" vs "a b c d e": matches 5/5, 4/4, 3/3, 2/2; c = 5, r = 5.
    # All precisions are 1; c = 9 < r = 11, so BLEU = BP = exp(1 - 11/9).
    got = compute_metrics(
        ["bleu"],
        output_texts=["the cat sat on", "a b c d e"],
        references=[["the cat sat on the mat"], ["a b c d e"]],
    )
    assert close(got["bleu"], math.exp(1 - 11 / 9))


def test_bleu_shortest_reference_and_clipping():
    # The reference length is the *shortest* reference (evaluate's bleu), not the closest one:
    # "the cat sat on the red mat" (7) matches every n-gram of the first reference (8 tokens);
    # r = min(8, 2) = 2 < c = 7, so BP = 1 and BLEU = 1 (sacrebleu, using the closest length 8, gives exp(-1/7)).
    got = compute_metrics(
        ["bleu"],
        output_texts=["the cat sat on the red mat"],
        references=[["the cat sat on the red mat today", "a cat"]],
    )
    assert close(got["bleu"], 1.0)
    # Clipping by the largest count in any one reference: "the the the the" vs ["the cat", "the the dog"]:
    #   1-grams: "the" x4, clipped to 2 (second reference) -> 2/4 (a sum over references would give 3/4);
    #   2-grams: "the the" x3, clipped to 1 -> 1/3; c = 4 > r = 2. With max_order 2: BLEU = sqrt(1/2 * 1/3).
    value = metrics.bleu(["the the the the"], [["the cat", "the the dog"]], max_order=2)
    assert close(value, math.sqrt(1 / 6))
    # No smoothing: an output shorter than 4 tokens has no 4-grams, so its BLEU is 0.
    assert compute_metrics(["bleu"], output_texts=["the cat"], references=[["the cat"]])["bleu"] == 0.0


def test_squad_normalisation():
    assert normalize_squad_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert normalize_squad_answer("An apple, a DAY.") == "apple day"
    assert normalize_squad_answer("theater") == "theater"  # only whole-word articles go


def test_squad_exact_match_and_f1():
    # Example 1: "the Eiffel Tower" -> "eiffel tower" equals the first reference: EM 1, F1 1.
    # Example 2: "in Paris France" vs "Paris": EM 0; shared tokens 1, P = 1/3, R = 1/1, F1 = 2PR/(P+R) = 1/2
    #            (vs "Lyon": 0; the best reference counts).
    got = compute_metrics(
        ["squad"],
        output_texts=["the Eiffel Tower", "in Paris France"],
        references=[["Eiffel Tower", "tower"], ["Lyon", "Paris"]],
    )
    assert set(got) == {"squad_exact_match", "squad_f1"}  # no collision with exact_match / f1
    assert close(got["squad_exact_match"], 0.5) and close(got["squad_f1"], 0.75)


class FakeBERTScorer:
    """Stands in for bert_score.BERTScorer: P = 0.9 always, R = 0, F = len(reference) / 10."""

    made = []

    def __init__(self, model_type=None, batch_size=64):
        FakeBERTScorer.made.append(model_type)

    def score(self, cands, refs):
        n = len(cands)
        return torch.full((n,), 0.9), torch.zeros(n), torch.tensor([len(r) / 10 for r in refs], dtype=torch.float64)


def test_bertscore_reports_f1_best_reference(monkeypatch):
    monkeypatch.setitem(sys.modules, "bert_score", types.SimpleNamespace(BERTScorer=FakeBERTScorer))
    monkeypatch.setattr(metrics, "_BERT_SCORERS", {})
    FakeBERTScorer.made.clear()
    scorer = Scorer(["bertscore"])
    scorer.add(output_texts=["x", "y"], references=[["ab", "abcd"], ["abc"]])
    # Best F per example: max(0.2, 0.4) = 0.4 and 0.3 -> mean 0.35 (precision would be 0.9).
    assert close(scorer.compute()["bertscore"], 0.35)
    assert FakeBERTScorer.made == ["microsoft/deberta-large-mnli"]


def test_bertscore_without_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "bert_score", None)  # makes `import bert_score` fail
    with pytest.raises(ImportError, match="pip install bert-score"):
        Scorer(["bertscore"])


# ---- errors and the registry ---------------------------------------------------------------------------


def test_references_must_be_flat_lists_of_strings():
    with pytest.raises(ValueError, match=r"references\[1\].*flat list of strings"):
        compute_metrics(["rouge"], output_texts=["a", "b"], references=[["a"], [["b"]]])
    with pytest.raises(ValueError, match=r"references\[0\] is str 'a'"):
        compute_metrics(["bleu"], output_texts=["a"], references=["a"])
    with pytest.raises(ValueError, match=r"references\[0\] is empty"):
        compute_metrics(["exact_match"], output_texts=["a"], references=[[]])
    with pytest.raises(ValueError, match=r"output_texts\[0\]"):
        compute_metrics(["exact_match"], output_texts=[None], references=[["a"]])
    scorer = Scorer(["squad"])
    with pytest.raises(ValueError, match="flat list"):  # caught at add(), before the dataset is done
        scorer.add(output_texts=["a"], references=[[["a"]]])


def test_errors():
    with pytest.raises(ValueError, match=r"Unknown metric 'blue'. Did you mean \['bleu'\]"):
        compute_metrics(["blue"], output_texts=["a"], references=[["a"]])
    with pytest.raises(ValueError, match="constant 1.0 placeholder"):
        canonical_name("custom")
    with pytest.raises(ValueError, match="missing \\['labels'\\]"):
        compute_metrics(["accuracy"], predictions=[0])
    with pytest.raises(ValueError, match="missing \\['output_texts', 'references'\\]"):
        compute_metrics(["bleu"], predictions=[0], labels=[0])
    with pytest.raises(ValueError, match="equally long"):
        compute_metrics(["accuracy"], predictions=[0, 1], labels=[0])
    with pytest.raises(ValueError, match="equally long"):
        compute_metrics(["bleu"], output_texts=["a", "b"], references=[["a"]])
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
        Scorer(["f2"])


def test_registry_names():
    assert set(METRICS) == {
        "accuracy", "matthews_correlation", "f1", "pearsonr", "spearmanr", "accuracy_multiple_ans",
        "exact_match", "exact_match_multiple_ans", "rougeL", "bleu", "squad", "bertscore",
    }
    assert "blue" not in METRICS and "custom" not in METRICS
