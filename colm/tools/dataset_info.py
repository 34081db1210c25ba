"""Dataset statistics per gin scope: size, token lengths, truncation at max_length, answer choices.

    parse_config(registry_files() + [model gin], bindings)   # registry_files: colm.datasets.families
    rows = collect(select_scopes(["D/P3*/EVAL"]), load_tokenizer("byt5"))
    print(format_table(rows)); write_outputs(rows, "exp_out/dataset_info", "p3_eval")

Lengths are counted as the model sees them before truncation: [bos] + tokens + [eos] (colm.datasets.dataset.tokenize).
A text counts as truncated when that length exceeds the dataset's max_length. A dataset that fails to
build or read becomes a row with an "error" and the others are still measured.
"""

import csv
import fnmatch
import json
import os

import gin
import numpy as np
from tqdm.auto import tqdm

from colm import registry
from colm.datasets.dataset import special_ids
from colm.datasets.families import REPO_ROOT
from colm.utils.atomic import atomic_path
from colm.utils.progress import interactive

DEFAULT_OUT_DIR = "exp_out/dataset_info"
_CHUNK = 256  # examples tokenized per tokenizer call


def parse_config(gin_files, bindings=()) -> None:
    """Parses the gin files (relative paths may also be relative to the repository root) and bindings."""
    from colm import configurables  # noqa: F401  (registers the dataset classes the registries name)
    from colm.ginparse import parse_gin

    resolved = [f if os.path.isfile(f) or not os.path.isfile(os.path.join(REPO_ROOT, f)) else os.path.join(REPO_ROOT, f)
                for f in gin_files]
    parse_gin(resolved, list(bindings))


def load_tokenizer(tokenizer=None, model_scope="M/MODEL"):
    """The tokenizer to count with.

    tokenizer: "byt5" (ByT5's byte tokenizer, needs no files), a local path or hub name (AutoTokenizer), or
    None: the `hf_tokenizer` of `model_scope` in the parsed gin config (pass a model gin file such as
    colm/models/tiny/t5.gin to parse_config).
    """
    if tokenizer == "byt5":
        from transformers import ByT5Tokenizer

        return ByT5Tokenizer()
    from colm.models.hf_loading import hf_tokenizer

    if tokenizer is not None:
        return hf_tokenizer(model_name_or_path=tokenizer)
    with gin.config_scope(model_scope.split("/")):
        try:
            return hf_tokenizer()
        except RuntimeError as error:
            if "Required bindings" not in str(error):
                raise
            raise ValueError(
                f"No tokenizer: pass a model gin file binding {model_scope}/hf_tokenizer.model_name_or_path "
                "(e.g. colm/models/tiny/t5.gin) or choose a tokenizer (e.g. 'byt5')."
            ) from error


def select_scopes(patterns, known=None) -> list:
    """Scopes matching the patterns, in pattern order then sorted, without repeats.

    A pattern with * ? or [ is matched (fnmatch: * also crosses "/", so "D/P3*/EVAL" includes
    D/P3ANLI/R1/EVAL) against the dataset scopes of the parsed config; a plain name is kept as it is, so
    an unknown one is reported with close matches when it is built.
    """
    known = [s for s in (registry.known_scopes() if known is None else known) if s.startswith("D/")]
    chosen = []
    for pattern in patterns:
        if any(ch in pattern for ch in "*?["):
            matched = sorted(s for s in known if fnmatch.fnmatchcase(s, pattern))
            if not matched:
                raise ValueError(
                    f"Scope pattern {pattern!r} matches none of the {len(known)} dataset scopes of the gin files "
                    f"given (e.g. {known[:3]}); check the pattern and the registry files."
                )
        else:
            matched = [pattern]
        chosen.extend(s for s in matched if s not in chosen)
    return chosen


def token_lengths(tokenizer, texts) -> np.ndarray:
    """Untruncated length of each text as colm tokenizes it: [bos] + tokens + [eos]."""
    bos_id, eos_id = special_ids(tokenizer)
    extra = (bos_id is not None) + (eos_id is not None)
    if not texts:
        return np.zeros(0, dtype=np.int64)
    ids = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    return np.array([len(x) + extra for x in ids], dtype=np.int64)


def summarize(values) -> dict:
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return {"mean": None, "p50": None, "p95": None, "max": None}
    return {
        "mean": float(values.mean()),
        "p50": float(np.percentile(values, 50)),
        "p95": float(np.percentile(values, 95)),
        "max": int(values.max()),
    }


def sample_indices(size, max_examples=None, seed=0) -> np.ndarray:
    """All indices, or a sorted random sample of max_examples of them."""
    if max_examples is None or max_examples <= 0 or size <= max_examples:
        return np.arange(size)
    return np.sort(np.random.default_rng(seed).choice(size, size=max_examples, replace=False))


def dataset_stats(dataset, tokenizer, max_examples=None, seed=0) -> dict:
    """Statistics of one built dataset (see the module docstring); measures a sample if max_examples is set."""
    input_lengths, target_lengths, num_choices = [], [], []
    indices = sample_indices(len(dataset), max_examples, seed)
    for start in range(0, len(indices), _CHUNK):
        examples = [dataset.get_example(int(i)) for i in indices[start : start + _CHUNK]]
        input_lengths.append(token_lengths(tokenizer, [ex["input_str"] for ex in examples]))
        target_lengths.append(token_lengths(tokenizer, [ex["target_str"] for ex in examples]))
        num_choices.extend(len(ex.get("answer_choices") or []) for ex in examples)
    inputs = np.concatenate(input_lengths) if input_lengths else np.zeros(0)
    targets = np.concatenate(target_lengths) if target_lengths else np.zeros(0)
    max_length = dataset.max_length

    def truncated(lengths):
        if max_length is None or lengths.size == 0:
            return 0.0
        return float(np.mean(lengths > max_length))

    return {
        "scope": dataset.name,
        "class": type(dataset).__name__,
        "split": dataset.split,
        "interface": dataset.interface_info.interface,
        "metrics": list(dataset.metrics),
        "examples": len(dataset),
        "measured": int(len(indices)),
        "max_length": max_length,
        "input_tokens": summarize(inputs),
        "target_tokens": summarize(targets),
        "input_truncated": truncated(inputs),
        "target_truncated": truncated(targets),
        "answer_choices": {
            "min": int(min(num_choices)) if num_choices else None,
            "mean": float(np.mean(num_choices)) if num_choices else None,
            "max": int(max(num_choices)) if num_choices else None,
        },
    }


def collect(scopes, tokenizer, max_examples=None, seed=0, progress=True) -> list:
    """One row per scope: its statistics, or {"scope", "error"} if it could not be built or read."""
    rows = []
    bar_off = not (progress and interactive())  # a bar on a terminal only, never frames in a log file
    for scope in tqdm(scopes, desc="datasets", unit="scope", disable=bar_off, dynamic_ncols=True):
        try:
            dataset = registry.get_object(scope)
            dataset.set_tokenizer(tokenizer)
            rows.append(dataset_stats(dataset, tokenizer, max_examples, seed))
        except Exception as error:  # noqa: BLE001  (report and go on with the other datasets)
            rows.append({"scope": scope, "error": f"{type(error).__name__}: {error}"})
            if progress:
                tqdm.write(f"[colm] {scope} failed: {rows[-1]['error'].splitlines()[0]}")
        finally:
            registry.reset()  # keep one dataset in memory at a time
    return rows


def flatten(row) -> dict:
    """{"input_tokens": {"mean": 3}} -> {"input_tokens_mean": 3}; lists become "a b" strings."""
    flat = {}
    for key, value in row.items():
        if isinstance(value, dict):
            flat.update({f"{key}_{k}": v for k, v in value.items()})
        elif isinstance(value, list):
            flat[key] = " ".join(str(v) for v in value)
        else:
            flat[key] = value
    return flat


def _fmt(value):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}".rstrip("0").rstrip(".") if value != int(value) else str(int(value))
    return str(value)


TABLE_COLUMNS = (
    ("scope", "scope"), ("examples", "examples"), ("measured", "measured"), ("max_len", "max_length"),
    ("in_mean", "input_tokens_mean"), ("in_p50", "input_tokens_p50"), ("in_p95", "input_tokens_p95"),
    ("in_max", "input_tokens_max"), ("in_trunc", "input_truncated"),
    ("tgt_mean", "target_tokens_mean"), ("tgt_p95", "target_tokens_p95"), ("tgt_max", "target_tokens_max"),
    ("tgt_trunc", "target_truncated"), ("choices", "answer_choices_mean"),
)


def format_table(rows) -> str:
    """A fixed-width table of the main columns; failed datasets are listed after it with their errors."""
    good = [flatten(r) for r in rows if "error" not in r]
    table = [[title for title, _ in TABLE_COLUMNS]] + [[_fmt(r.get(key)) for _, key in TABLE_COLUMNS] for r in good]
    widths = [max(len(line[i]) for line in table) for i in range(len(TABLE_COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in table]
    lines += [f"FAILED {r['scope']}: {r['error']}" for r in rows if "error" in r]
    return "\n".join(lines)


def write_outputs(rows, out_dir=DEFAULT_OUT_DIR, name="dataset_info") -> list:
    """Writes <out_dir>/<name>.json (rows as they are) and <name>.csv (flattened); returns the paths."""
    json_path = os.path.join(out_dir, f"{name}.json")
    csv_path = os.path.join(out_dir, f"{name}.csv")
    with atomic_path(json_path) as tmp, open(tmp, "w") as f:
        json.dump(rows, f, indent=1)
    flat = [flatten(r) for r in rows]
    fields = []
    for r in flat:
        fields.extend(k for k in r if k not in fields)
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(flat)
    return [json_path, csv_path]
