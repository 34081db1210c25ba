"""Evaluation metrics, looked up by name from one registry (spec 6.5, with the original's defects fixed).

Inputs, as the Evaluator hands them over:
- "mc" datasets: `predictions` and `labels` are answer-choice indices; `multi_labels` lists the indices
  that count as correct (BIG-bench).
- "gen" datasets: `output_texts` are the generated strings and `references` holds, per example, a flat
  list of reference strings (never a bare string, never nested lists: both are rejected with an error).

Every metric returns full-precision values (rounding is the Evaluator's job). Scores lie in [0, 1],
except the correlations (matthews_correlation, pearsonr, spearmanr), which lie in [-1, 1]. A metric
returns one value, reported under its registry name, or a dict of values under their own keys:
"squad" reports "squad_exact_match" and "squad_f1" (so they never collide with "exact_match" / "f1").
`Scorer` accumulates batches and computes at the end.

The original's "custom" metric (a constant 1.0 placeholder) does not exist here: a dataset that should
not be scored lists no metrics (metrics=[]); whether such a dataset is still run for its analysis
processors is the Evaluator's decision.
"""

import difflib
import math
import re
import string
import warnings
from collections import Counter

import gin
import numpy as np

_ROUGE_SCORER = None


def _rouge_scorer():
    global _ROUGE_SCORER
    if _ROUGE_SCORER is None:
        from rouge_score import rouge_scorer

        _ROUGE_SCORER = rouge_scorer.RougeScorer(["rougeL"])
    return _ROUGE_SCORER


# ---- input checks ---------------------------------------------------------------------------------------


def check_references(references):
    """Raises unless every example's references are a non-empty flat list of strings."""
    for i, refs in enumerate(references):
        if isinstance(refs, str) or not isinstance(refs, (list, tuple)):
            raise ValueError(
                f"references[{i}] is {type(refs).__name__} {refs!r}; each example's references must be a "
                "flat list of strings, e.g. ['Paris'] (wrap a single string in a list in the dataset class)."
            )
        if not refs:
            raise ValueError(f"references[{i}] is empty; each example needs at least one reference string.")
        for ref in refs:
            if not isinstance(ref, str):
                raise ValueError(
                    f"references[{i}] = {refs!r} holds a {type(ref).__name__}, not a string; references must "
                    "be a flat list of strings per example (flatten nested lists like [['summary']] in the "
                    "dataset class)."
                )


def _check_output_texts(output_texts):
    for i, out in enumerate(output_texts):
        if not isinstance(out, str):
            raise ValueError(f"output_texts[{i}] is {type(out).__name__} {out!r}; generated outputs must be strings.")


def _mean_best_over_references(score_pairs, output_texts, references):
    """Mean over examples of the best score among that example's (output, reference) pairs.

    score_pairs(outputs, refs) scores aligned lists of strings at once (so a model-based metric can
    batch them); per-pair functions are wrapped with `_each`.
    """
    pairs = [(out, ref) for out, refs in zip(output_texts, references) for ref in refs]
    scores = list(score_pairs([out for out, _ in pairs], [ref for _, ref in pairs]))
    best, start = [], 0
    for refs in references:
        best.append(max(scores[start : start + len(refs)]))
        start += len(refs)
    return float(np.mean(best))


def _each(score):
    """Turns score(output, reference) into the batched form _mean_best_over_references takes."""
    return lambda outputs, refs: [score(out, ref) for out, ref in zip(outputs, refs)]


# ---- classification metrics (answer-choice indices) ---------------------------------------------------


def accuracy(predictions, labels):
    return float(np.mean([int(p) == int(lab) for p, lab in zip(predictions, labels)]))


def matthews_correlation(predictions, labels):
    """Matthews correlation from the confusion matrix (multi-class form; 0 when undefined)."""
    predictions = np.asarray(predictions, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    classes, indices = np.unique(np.concatenate([labels, predictions]), return_inverse=True)
    true_idx, pred_idx = indices[: len(labels)], indices[len(labels) :]
    confusion = np.zeros((len(classes), len(classes)), dtype=np.float64)
    np.add.at(confusion, (true_idx, pred_idx), 1)
    true_per_class, pred_per_class = confusion.sum(axis=1), confusion.sum(axis=0)
    correct, total = np.trace(confusion), confusion.sum()
    numerator = correct * total - true_per_class @ pred_per_class
    denominator = math.sqrt((total**2 - pred_per_class @ pred_per_class) * (total**2 - true_per_class @ true_per_class))
    return float(numerator / denominator) if denominator > 0 else 0.0


def f1(predictions, labels):
    """Binary F1 of class 1 (evaluate's default average="binary"): 2TP / (2TP + FP + FN), 0 if undefined."""
    predictions = np.asarray(predictions, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    outside = sorted(set(np.unique(np.concatenate([labels, predictions])).tolist()) - {0, 1})
    if outside:
        raise ValueError(
            f"f1 is binary F1 of class 1 and needs labels and predictions in {{0, 1}}; got also {outside}. "
            "Use accuracy (or matthews_correlation) for datasets with more than two answer choices."
        )
    tp = int(np.sum((predictions == 1) & (labels == 1)))
    fp = int(np.sum((predictions == 1) & (labels == 0)))
    fn = int(np.sum((predictions == 0) & (labels == 1)))
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def _correlation(kind, predictions, labels):
    from scipy import stats

    x = np.asarray(predictions, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    if len(x) < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        warnings.warn(
            f"{kind} is undefined for constant predictions or labels (or fewer than 2 examples); reported as 0.",
            stacklevel=3,
        )
        return 0.0
    fn = stats.pearsonr if kind == "pearsonr" else stats.spearmanr
    return float(fn(x, y)[0])


def pearsonr(predictions, labels):
    """Pearson correlation of the predicted and gold answer-choice indices.

    Meaningful only when the choices are ordered values (e.g. ratings "1".."5" in that order).
    """
    return _correlation("pearsonr", predictions, labels)


def spearmanr(predictions, labels):
    """Spearman rank correlation of the predicted and gold answer-choice indices (see pearsonr)."""
    return _correlation("spearmanr", predictions, labels)


def accuracy_multiple_ans(predictions, multi_labels):
    return float(np.mean([int(p) in [int(x) for x in ok] for p, ok in zip(predictions, multi_labels)]))


# ---- generation metrics (output text vs reference strings) --------------------------------------------


def exact_match(output_texts, references):
    """Output equal to the first reference, ignoring surrounding whitespace (no other normalisation)."""
    return float(np.mean([out.strip() == refs[0].strip() for out, refs in zip(output_texts, references)]))


def exact_match_multiple_ans(output_texts, references):
    """Output equal to any reference, ignoring surrounding whitespace."""
    return _mean_best_over_references(_each(lambda out, ref: float(out.strip() == ref.strip())), output_texts, references)


def rouge_l(output_texts, references):
    """ROUGE-L F-measure (rouge_score, no stemming), best reference per example, averaged."""
    scorer = _rouge_scorer()
    return _mean_best_over_references(
        _each(lambda out, ref: scorer.score(ref, out)["rougeL"].fmeasure), output_texts, references
    )


# The mteval-v13a tokenization (as sacrebleu's "13a"): split off punctuation and symbols, but keep
# periods and commas inside numbers and dashes that do not follow a digit.
_13A_RULES = (
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),
)
_HTML_ENTITIES = (("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">"))


def tokenize_13a(text):
    text = text.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in text:
        for entity, char in _HTML_ENTITIES:
            text = text.replace(entity, char)
    text = f" {text} "
    for pattern, replacement in _13A_RULES:
        text = pattern.sub(replacement, text)
    return text.split()


def _ngram_counts(tokens, n):
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def bleu(output_texts, references, max_order=4):
    """Corpus BLEU as HF evaluate's "bleu" computes it (its "bleu" value, in [0, 1]).

    13a tokens, case kept; n-gram counts clipped by the maximum count in any one reference; precisions
    summed over the corpus for n = 1..max_order, no smoothing (any zero precision gives 0); brevity
    penalty exp(1 - r/c) when c <= r, with c the output length and r the *shortest* reference length.
    """
    matches = [0] * max_order
    possible = [0] * max_order
    output_length = reference_length = 0
    for out, refs in zip(output_texts, references):
        out_tokens = tokenize_13a(out)
        ref_tokens = [tokenize_13a(ref) for ref in refs]
        output_length += len(out_tokens)
        reference_length += min(len(r) for r in ref_tokens)
        for n in range(1, max_order + 1):
            max_ref_counts = Counter()
            for r in ref_tokens:
                max_ref_counts |= _ngram_counts(r, n)
            counts = _ngram_counts(out_tokens, n)
            matches[n - 1] += sum(min(count, max_ref_counts[gram]) for gram, count in counts.items())
            possible[n - 1] += max(0, len(out_tokens) - n + 1)
    precisions = [m / p if p > 0 else 0.0 for m, p in zip(matches, possible)]
    if min(precisions) == 0:
        return 0.0
    geometric_mean = math.exp(sum(math.log(p) for p in precisions) / max_order)
    ratio = output_length / reference_length if reference_length else float("inf")
    brevity_penalty = 1.0 if ratio > 1.0 else math.exp(1 - 1 / ratio)
    return float(geometric_mean * brevity_penalty)


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_squad_answer(text):
    """SQuAD v1.1 normalisation: lowercase, drop punctuation, drop articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _squad_exact(out, ref):
    return float(normalize_squad_answer(out) == normalize_squad_answer(ref))


def _squad_f1(out, ref):
    """Token-level F1 of the normalised answers (v1.1: 0 when nothing is shared, even if both are empty)."""
    out_tokens = normalize_squad_answer(out).split()
    ref_tokens = normalize_squad_answer(ref).split()
    shared = sum((Counter(out_tokens) & Counter(ref_tokens)).values())
    if shared == 0:
        return 0.0
    precision, recall = shared / len(out_tokens), shared / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def squad(output_texts, references):
    """SQuAD v1.1 exact match and F1 (best reference per example, averaged), as fractions, not percents."""
    return {
        "squad_exact_match": _mean_best_over_references(_each(_squad_exact), output_texts, references),
        "squad_f1": _mean_best_over_references(_each(_squad_f1), output_texts, references),
    }


_BERT_SCORERS = {}


def _require_bert_score():
    try:
        import bert_score
    except ImportError as error:
        raise ImportError(
            "The 'bertscore' metric needs the optional package bert-score: pip install bert-score==0.3.13 "
            "(its model, e.g. microsoft/deberta-large-mnli, must also be downloadable or cached)."
        ) from error
    return bert_score


@gin.configurable
def bertscore(output_texts, references, model_type="microsoft/deberta-large-mnli", batch_size=64):
    """BERTScore F1 (the original reported precision), best reference per example, averaged."""
    bert_score = _require_bert_score()
    if model_type not in _BERT_SCORERS:
        _BERT_SCORERS[model_type] = bert_score.BERTScorer(model_type=model_type, batch_size=batch_size)
    scorer = _BERT_SCORERS[model_type]

    def f1_of_pairs(outputs, refs):
        _, _, f_scores = scorer.score(outputs, refs)
        return [float(f) for f in f_scores]

    return _mean_best_over_references(f1_of_pairs, output_texts, references)


# ---- registry --------------------------------------------------------------------------------------------

# name -> (function, the compute_metrics arguments it takes, in order)
METRICS = {
    "accuracy": (accuracy, ("predictions", "labels")),
    "matthews_correlation": (matthews_correlation, ("predictions", "labels")),
    "f1": (f1, ("predictions", "labels")),
    "pearsonr": (pearsonr, ("predictions", "labels")),
    "spearmanr": (spearmanr, ("predictions", "labels")),
    "accuracy_multiple_ans": (accuracy_multiple_ans, ("predictions", "multi_labels")),
    "exact_match": (exact_match, ("output_texts", "references")),
    "exact_match_multiple_ans": (exact_match_multiple_ans, ("output_texts", "references")),
    "rougeL": (rouge_l, ("output_texts", "references")),
    "bleu": (bleu, ("output_texts", "references")),
    "squad": (squad, ("output_texts", "references")),
    "bertscore": (bertscore, ("output_texts", "references")),
}
ALIASES = {"rouge": "rougeL"}
# Checked when a Scorer is made, so a missing optional package fails before a long generation run.
_REQUIREMENTS = {"bertscore": _require_bert_score}
_REMOVED = {
    "custom": "the original's 'custom' metric was a constant 1.0 placeholder. List real metrics, or none "
    "(metrics=[]) for a dataset that is not to be scored.",
}


def canonical_name(name):
    if name in _REMOVED:
        raise ValueError(f"Unknown metric {name!r}: {_REMOVED[name]}")
    name = ALIASES.get(name, name)
    if name not in METRICS:
        known = sorted(METRICS) + sorted(ALIASES)
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
        hint = f"Did you mean {close}? " if close else ""
        raise ValueError(f"Unknown metric {name!r}. {hint}Known metrics: {known}.")
    return name


def compute_metrics(metric_names, predictions=None, labels=None, output_texts=None, references=None, multi_labels=None):
    """Returns {metric key: value} for each name in metric_names."""
    given = {
        "predictions": predictions,
        "labels": labels,
        "output_texts": output_texts,
        "references": references,
        "multi_labels": multi_labels,
    }
    results = {}
    for name in metric_names:
        key = canonical_name(name)
        fn, arg_names = METRICS[key]
        args = [given[a] for a in arg_names]
        missing = [a for a, v in zip(arg_names, args) if v is None]
        if missing:
            raise ValueError(f"Metric {key!r} needs {list(arg_names)}; missing {missing}.")
        sizes = {a: len(v) for a, v in zip(arg_names, args)}
        if len(set(sizes.values())) != 1 or 0 in sizes.values():
            raise ValueError(f"Metric {key!r} needs equally long, non-empty inputs; got sizes {sizes}.")
        if "references" in arg_names:
            check_references(references)
        if "output_texts" in arg_names:
            _check_output_texts(output_texts)
        value = fn(*args)
        results.update(value if isinstance(value, dict) else {key: value})
    return results


def _as_list(values):
    return values.tolist() if hasattr(values, "tolist") else list(values)


class Scorer:
    """Accumulates predictions batch by batch; compute() scores everything seen."""

    FIELDS = ("predictions", "labels", "output_texts", "references", "multi_labels")

    def __init__(self, metric_names):
        self.metric_names = [canonical_name(n) for n in metric_names]
        for name in self.metric_names:
            if name in _REQUIREMENTS:
                _REQUIREMENTS[name]()
        self.seen = {f: [] for f in self.FIELDS}

    def add(self, predictions=None, labels=None, output_texts=None, references=None, multi_labels=None):
        batch = dict(
            predictions=predictions,
            labels=labels,
            output_texts=output_texts,
            references=references,
            multi_labels=multi_labels,
        )
        for field, values in batch.items():
            values = None if values is None else _as_list(values)
            # A column of Nones (e.g. multi_label of single-answer data) counts as not given.
            if values is not None and any(v is not None for v in values):
                if field == "references":
                    check_references(values)  # fail on the first bad batch, not after the whole dataset
                self.seen[field].extend(values)

    add_batch = add

    def compute(self):
        kwargs = {f: (v if v else None) for f, v in self.seen.items()}
        return compute_metrics(self.metric_names, **kwargs)
