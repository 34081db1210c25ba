"""Evaluation metrics, looked up by name from one registry.

Every metric returns a value in [0, 1] at full precision (rounding is the
Evaluator's job). `Scorer` accumulates batches and computes at the end.
"""

import numpy as np

_ROUGE_SCORER = None


def _rouge_scorer():
    global _ROUGE_SCORER
    if _ROUGE_SCORER is None:
        from rouge_score import rouge_scorer

        _ROUGE_SCORER = rouge_scorer.RougeScorer(["rougeL"])
    return _ROUGE_SCORER


def accuracy(predictions, labels):
    return float(np.mean([int(p) == int(lab) for p, lab in zip(predictions, labels)]))


def exact_match(output_texts, references):
    return float(np.mean([out.strip() == refs[0].strip() for out, refs in zip(output_texts, references)]))


def rouge_l(output_texts, references):
    scorer = _rouge_scorer()
    scores = [
        max(scorer.score(ref, out)["rougeL"].fmeasure for ref in refs) for out, refs in zip(output_texts, references)
    ]
    return float(np.mean(scores))


def exact_match_multiple_ans(output_texts, references):
    return float(np.mean([out.strip() in [r.strip() for r in refs] for out, refs in zip(output_texts, references)]))


def accuracy_multiple_ans(predictions, multi_labels):
    return float(np.mean([int(p) in [int(x) for x in ok] for p, ok in zip(predictions, multi_labels)]))


# name -> (function, the compute_metrics arguments it takes, in order)
METRICS = {
    "accuracy": (accuracy, ("predictions", "labels")),
    "exact_match": (exact_match, ("output_texts", "references")),
    "rougeL": (rouge_l, ("output_texts", "references")),
    "exact_match_multiple_ans": (exact_match_multiple_ans, ("output_texts", "references")),
    "accuracy_multiple_ans": (accuracy_multiple_ans, ("predictions", "multi_labels")),
}
ALIASES = {"rouge": "rougeL"}


def canonical_name(name):
    name = ALIASES.get(name, name)
    if name not in METRICS:
        raise ValueError(f"Unknown metric {name!r}; known metrics: {sorted(METRICS) + sorted(ALIASES)}.")
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
        results[key] = fn(*args)
    return results


def _as_list(values):
    return values.tolist() if hasattr(values, "tolist") else list(values)


class Scorer:
    """Accumulates predictions batch by batch; compute() scores everything seen."""

    FIELDS = ("predictions", "labels", "output_texts", "references", "multi_labels")

    def __init__(self, metric_names):
        self.metric_names = [canonical_name(n) for n in metric_names]
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
                self.seen[field].extend(values)

    add_batch = add

    def compute(self):
        kwargs = {f: (v if v else None) for f, v in self.seen.items()}
        return compute_metrics(self.metric_names, **kwargs)
