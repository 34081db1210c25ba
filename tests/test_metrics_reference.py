"""colm.datasets.metrics against reference implementations, on a few hundred random cases each.

HF `evaluate` cannot be used here: `evaluate.load("accuracy")` (and bleu, rouge, squad, ...) fetches the metric's
script from the Hugging Face Hub at run time, and with HF_HUB_OFFLINE=1 (or no network) it fails with
"Couldn't find a module script". So each metric is tested against the library `evaluate`'s script wraps:

    metric                 evaluate's script wraps                   reference here
    accuracy               sklearn.metrics.accuracy_score             the same
    f1                     sklearn.metrics.f1_score (binary)          the same
    matthews_correlation   sklearn.metrics.matthews_corrcoef          the same
    pearsonr, spearmanr    scipy.stats                                numpy: corrcoef of values / of ranks
    bleu                   tensorflow/nmt compute_bleu + 13a tokens   sacrebleu (tokens, n-gram counts, BLEU formula)
    rougeL                 rouge_score                                rouge_score, and an LCS written here
    squad                  the official SQuAD v1.1 script             its definition, written out below
    exact_match            numpy string equality                      plain string equality

Where ours differs by design, the test says so and shows the difference on an example.
"""

import math
import random
import re
import string

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
sacrebleu = pytest.importorskip("sacrebleu")
sklearn_metrics = pytest.importorskip("sklearn.metrics")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from rouge_score import rouge_scorer  # noqa: E402
from sacrebleu.metrics import BLEU  # noqa: E402
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a  # noqa: E402
from scipy import stats  # noqa: E402

from colm.datasets import metrics  # noqa: E402

CASES = 300  # random cases per comparison
SETTINGS = settings(max_examples=CASES, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TOLERANCE = 1e-9  # every comparison below is of the same arithmetic in another order: agreement to rounding

# ---- random inputs ---------------------------------------------------------------------------------------

def random_choices(seed, classes=5):
    """(labels, predictions): 1..60 answer-choice indices in [0, classes), made from a seed; few classes, so
    that they repeat, and now and then a single class (the edge cases where metrics are undefined)."""
    rng = random.Random(seed)
    n = rng.randint(1, 60)
    used = rng.choice([1, classes, classes])
    return [rng.randrange(used) for _ in range(n)], [rng.randrange(classes) for _ in range(n)]


# Words from a small vocabulary, so that outputs and references share n-grams; it holds what the 13a tokenizer
# and the SQuAD / ROUGE normalisations treat specially: punctuation, numbers with . and , , dashes, articles,
# HTML entities, upper case and non-ASCII letters.
VOCABULARY = ["the", "The", "a", "an", "cat", "Cat", "sat", "on", "mat", "dog", "ran", "fast", ".", ",", "!", "?",
              "3.5", "1,000", "-", "a-b", "x-1", "2-3", "(", ")", "$", "%", "'s", "don't", "&amp;", "&lt;", "\"",
              "naïve", "café", "über", "東京", "e.g.", "U.S.", "end."]
SEPARATORS = [" ", " ", " ", "", "  ", "\t"]


def random_sentence(rng, max_words=14):
    return "".join(rng.choice(VOCABULARY) + rng.choice(SEPARATORS) for _ in range(rng.randint(0, max_words)))


def random_generation_case(seed, max_examples=8, max_references=3):
    """(output_texts, references) made from a seed: 1..max_examples outputs and, per output, 1..max_references
    reference strings. Some references copy the output with words dropped, so that scores spread over [0, 1].
    (Cases come from a seed rather than from hypothesis' own draws: some hundred draws per case made those tests
    ten times slower; a failure still names its seed.)"""
    rng = random.Random(seed)
    outputs, references = [], []
    for _ in range(rng.randint(1, max_examples)):
        out = random_sentence(rng)
        refs = []
        for _ in range(rng.randint(1, max_references)):
            if out and rng.random() < 0.5:
                kept = [w for w in out.split() if rng.random() < 0.7]
                refs.append(" ".join(kept) + " " + random_sentence(rng, max_words=3))
            else:
                refs.append(random_sentence(rng))
        outputs.append(out)
        references.append(refs)
    return outputs, references


seeds = st.integers(0, 2**32 - 1)
labels_and_predictions = seeds.map(random_choices)
binary_pairs = seeds.map(lambda seed: random_choices(seed, classes=2))
generation_cases = seeds.map(random_generation_case)
single_reference_cases = seeds.map(lambda seed: random_generation_case(seed, max_references=1))
sentences = seeds.map(lambda seed: random_sentence(random.Random(seed), max_words=30))


# ---- classification metrics against scikit-learn ------------------------------------------------------


@SETTINGS
@given(labels_and_predictions)
def test_accuracy_equals_sklearn(case):
    labels, predictions = case
    ours = metrics.accuracy(predictions, labels)
    assert abs(ours - sklearn_metrics.accuracy_score(labels, predictions)) <= TOLERANCE


@pytest.mark.filterwarnings("ignore:A single label was found")
@SETTINGS
@given(labels_and_predictions)
def test_matthews_correlation_equals_sklearn(case):
    # Both give 0 where the correlation is undefined (one class only in labels or predictions).
    labels, predictions = case
    ours = metrics.matthews_correlation(predictions, labels)
    assert abs(ours - sklearn_metrics.matthews_corrcoef(labels, predictions)) <= TOLERANCE


@SETTINGS
@given(binary_pairs)
def test_f1_equals_sklearn_binary_f1(case):
    labels, predictions = case
    ours = metrics.f1(predictions, labels)
    reference = sklearn_metrics.f1_score(labels, predictions, average="binary", pos_label=1, zero_division=0.0)
    assert abs(ours - reference) <= TOLERANCE


def test_f1_refuses_more_than_two_classes_as_sklearn_binary_does():
    with pytest.raises(ValueError, match="binary"):
        metrics.f1([0, 1, 2], [0, 1, 1])
    with pytest.raises(ValueError):
        sklearn_metrics.f1_score([0, 1, 1], [0, 1, 2], average="binary")


# ---- correlations against numpy -------------------------------------------------------------------------


def _not_constant(case):
    labels, predictions = case
    return len(labels) >= 2 and len(set(labels)) > 1 and len(set(predictions)) > 1


@SETTINGS
@given(labels_and_predictions.filter(_not_constant))
def test_pearsonr_and_spearmanr_equal_numpy(case):
    labels, predictions = case
    pearson = np.corrcoef(np.asarray(predictions, float), np.asarray(labels, float))[0, 1]
    spearman = np.corrcoef(stats.rankdata(predictions), stats.rankdata(labels))[0, 1]  # ties: average ranks
    assert abs(metrics.pearsonr(predictions, labels) - pearson) <= TOLERANCE
    assert abs(metrics.spearmanr(predictions, labels) - spearman) <= TOLERANCE


def test_correlations_of_constant_inputs_are_zero_by_design():
    # Different by design: scipy (and so evaluate's pearsonr / spearmanr) return nan for a constant input, which
    # would make a dataset's average score nan; ours reports 0 with a warning.
    with pytest.warns(UserWarning, match="undefined"):
        assert metrics.pearsonr([1, 1, 1], [0, 1, 2]) == 0.0
    with pytest.warns(UserWarning, match="undefined"):
        assert metrics.spearmanr([0, 1, 2], [2, 2, 2]) == 0.0
    with pytest.warns(stats.ConstantInputWarning):
        assert math.isnan(stats.pearsonr([1.0, 1.0, 1.0], [0.0, 1.0, 2.0])[0])


# ---- BLEU against sacrebleu --------------------------------------------------------------------------------


@SETTINGS
@given(st.one_of(sentences, st.text(max_size=60)))
def test_13a_tokens_equal_sacrebleus(text):
    assert metrics.tokenize_13a(text) == Tokenizer13a()(text).split()


def sacrebleu_with_shortest_reference(output_texts, references):
    """sacrebleu's corpus BLEU (13a tokens, no smoothing, case kept) with the reference length taken as the
    shortest reference of each example, as evaluate's "bleu" (tensorflow/nmt compute_bleu) takes it; sacrebleu
    itself takes the reference closest in length to the output. Same n-gram counts, same formula otherwise."""
    width = max(len(refs) for refs in references)
    streams = [[refs[i] if i < len(refs) else None for refs in references] for i in range(width)]
    result = sacrebleu.corpus_bleu(output_texts, streams, smooth_method="none", tokenize="13a", force=True)
    tokenize = Tokenizer13a()
    shortest = sum(min(len(tokenize(ref).split()) for ref in refs) for refs in references)
    return BLEU.compute_bleu(result.counts, result.totals, result.sys_len, shortest).score / 100


@SETTINGS
@given(generation_cases)
def test_bleu_equals_sacrebleu_with_the_shortest_reference_length(case):
    outputs, references = case
    assert abs(metrics.bleu(outputs, references) - sacrebleu_with_shortest_reference(outputs, references)) <= TOLERANCE


@SETTINGS
@given(single_reference_cases)
def test_bleu_with_one_reference_equals_plain_sacrebleu(case):
    # With one reference per example, shortest and closest are the same reference: sacrebleu's own corpus_bleu.
    outputs, references = case
    plain = sacrebleu.corpus_bleu(outputs, [[refs[0] for refs in references]], smooth_method="none",
                                  tokenize="13a", force=True).score / 100
    assert abs(metrics.bleu(outputs, references) - plain) <= TOLERANCE


def test_bleu_reference_length_is_the_shortest_by_design():
    # Different from sacrebleu by design (the original scored BLEU with evaluate's "bleu", tensorflow/nmt's
    # compute_bleu): the brevity penalty uses the shortest reference, sacrebleu's the closest in length.
    # Output of 6 tokens, references of 4 and 7: every n-gram of the output is in the second reference.
    outputs, references = ["a b c d e f"], [["a b c d", "a b c d e f g"]]
    assert metrics.bleu(outputs, references) == 1.0  # shortest 4 <= 6: no penalty
    closest = sacrebleu.corpus_bleu(outputs, [["a b c d"], ["a b c d e f g"]], smooth_method="none").score / 100
    assert abs(closest - math.exp(1 - 7 / 6)) <= TOLERANCE  # closest 7 > 6: penalised


# ---- ROUGE-L against rouge_score and an LCS written here -----------------------------------------------


def lcs_length(a, b):
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def rouge_tokens(text):
    """rouge_score's default tokenizer: lower case, anything but [a-z0-9] separates tokens (non-ASCII letters
    are dropped: by design of rouge_score, and so of evaluate's rouge and ours)."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def lcs_f_measure(output, reference):
    out, ref = rouge_tokens(output), rouge_tokens(reference)
    common = lcs_length(out, ref)
    if not out or not ref or common == 0:
        return 0.0
    precision, recall = common / len(out), common / len(ref)
    return 2 * precision * recall / (precision + recall)


@SETTINGS
@given(generation_cases)
def test_rouge_l_equals_rouge_score_and_an_lcs(case):
    outputs, references = case
    ours = metrics.rouge_l(outputs, references)
    # evaluate's rouge with use_aggregator=False: rouge_score's score_multi (the best reference by F-measure) per
    # example; its default use_aggregator=True reports a bootstrap median of the mean instead, close to it but not
    # the mean, so not compared.
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    per_example = [scorer.score_multi(refs, out)["rougeL"].fmeasure for out, refs in zip(outputs, references)]
    assert abs(ours - float(np.mean(per_example))) <= TOLERANCE
    independent = np.mean([max(lcs_f_measure(out, ref) for ref in refs) for out, refs in zip(outputs, references)])
    assert abs(ours - independent) <= TOLERANCE


# ---- SQuAD against its published definition --------------------------------------------------------------
# Written here from the SQuAD v1.1 definition (not from its script): an answer is compared after lower-casing,
# deleting ASCII punctuation, deleting the articles a / an / the as whole words and collapsing whitespace; EM is
# equality of the normalised strings, F1 the harmonic mean of token precision and recall over the multiset
# overlap; each prediction takes its best reference; the mean is over examples (the script reports percentages,
# ours fractions).
_DROP_PUNCTUATION = str.maketrans("", "", string.punctuation)


def squad_tokens(text):
    words = text.lower().translate(_DROP_PUNCTUATION).split()
    return [w for w in words if w not in ("a", "an", "the")]


def squad_pair_scores(prediction, reference):
    """(exact match, F1) of one prediction against one reference."""
    ours, theirs = squad_tokens(prediction), squad_tokens(reference)
    exact = float(ours == theirs)
    remaining, shared = list(theirs), 0
    for token in ours:
        if token in remaining:
            remaining.remove(token)
            shared += 1
    if shared == 0:
        return exact, 0.0
    precision, recall = shared / len(ours), shared / len(theirs)
    return exact, 2 * precision * recall / (precision + recall)


@SETTINGS
@given(generation_cases)
def test_squad_equals_its_definition(case):
    outputs, references = case
    ours = metrics.squad(outputs, references)
    best = [[max(squad_pair_scores(o, r)[j] for r in refs) for o, refs in zip(outputs, references)] for j in (0, 1)]
    assert abs(ours["squad_exact_match"] - np.mean(best[0])) <= TOLERANCE
    assert abs(ours["squad_f1"] - np.mean(best[1])) <= TOLERANCE


# ---- exact match against evaluate's definition ------------------------------------------------------------


@SETTINGS
@given(single_reference_cases)
def test_exact_match_is_evaluates_after_stripping(case):
    # evaluate's exact_match with its defaults is mean(prediction == reference); ours ignores surrounding
    # whitespace (by design: generated text often ends in a space or newline the reference lacks) and nothing else.
    outputs, references = case
    evaluate_definition = np.mean([o.strip() == refs[0].strip() for o, refs in zip(outputs, references)])
    assert metrics.exact_match(outputs, references) == evaluate_definition
    assert metrics.exact_match(["Paris "], [["Paris"]]) == 1.0 and metrics.exact_match(["paris"], [["Paris"]]) == 0.0
