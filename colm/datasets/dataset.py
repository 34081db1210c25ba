"""Base dataset, interface description and tokenization helpers.

A concrete dataset subclasses `Dataset`, implements `load_data` (and, if it does
not keep a list in `self.examples`, `__len__` and `get_example`). Each example is
a dict with at least `input_str`, `target_str` and `answer_choices`; the base
class turns it into token ids (`__getitem__`) and batches (`collate`).
"""

import warnings

import gin
import numpy as np
import torch

INTERFACES = ("lm", "gen", "mc")


@gin.configurable
class InterfaceInfo:
    """How a model should be run on a dataset (training loss or evaluation mode).

    interface: "lm" (teacher-forced loss), "gen" (generate text) or "mc"
    (score the answer choices and pick the best).
    """

    def __init__(
        self,
        interface="lm",
        num_beams=1,
        max_gen_length=20,
        length_normalization=True,
        multiple_choice_loss=0,
        unlikelihood_loss=0,
        input_loss=0,
        **kwargs,
    ):
        if interface not in INTERFACES:
            raise ValueError(f"InterfaceInfo.interface={interface!r} is not supported; use one of {list(INTERFACES)}.")
        if kwargs:
            warnings.warn(
                f"InterfaceInfo ignores unknown parameters {sorted(kwargs)}; check the gin bindings for typos.",
                stacklevel=2,
            )
        self.interface = interface
        self.num_beams = num_beams
        self.max_gen_length = max_gen_length
        self.length_normalization = length_normalization
        self.multiple_choice_loss = multiple_choice_loss
        self.unlikelihood_loss = unlikelihood_loss
        self.input_loss = input_loss

    def to_dict(self):
        return dict(vars(self))

    def __repr__(self):
        fields = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items())
        return f"InterfaceInfo({fields})"


def special_ids(tokenizer):
    """Returns (bos_id or None, eos_id or None) that the tokenizer adds itself.

    Probed once by encoding a dummy text with and without special tokens, then
    cached on the tokenizer as `colm_bos_id` / `colm_eos_id` (which callers may
    also set by hand).
    """
    if hasattr(tokenizer, "colm_bos_id") and hasattr(tokenizer, "colm_eos_id"):
        return tokenizer.colm_bos_id, tokenizer.colm_eos_id
    text = "colm probe text"
    with_special = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    plain = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    leading, trailing = None, None
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start : start + len(plain)] == plain:
            leading = with_special[:start]
            trailing = with_special[start + len(plain) :]
            break
    if leading is None or len(leading) > 1 or len(trailing) > 1:
        raise ValueError(
            f"Could not infer bos/eos of tokenizer {type(tokenizer).__name__}: "
            f"{with_special} (with special tokens) vs {plain} (without). Set "
            "tokenizer.colm_bos_id and tokenizer.colm_eos_id by hand."
        )
    bos_id = leading[0] if leading else None
    eos_id = trailing[0] if trailing else None
    tokenizer.colm_bos_id, tokenizer.colm_eos_id = bos_id, eos_id
    return bos_id, eos_id


def _water_fill(lengths, budget):
    """Per-segment kept lengths summing to at most `budget`.

    Segments shorter than the common cap are kept whole; longer ones are cut to
    the cap, and the rounding leftover goes (+1 each) to the earliest long ones.
    """
    if sum(lengths) <= budget:
        return list(lengths)
    remaining, cap = budget, 0
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    for rank, i in enumerate(order):
        share = remaining // (len(order) - rank)
        if lengths[i] <= share:
            remaining -= lengths[i]
        else:
            cap = share
            break
    long_ids = [i for i in range(len(lengths)) if lengths[i] > cap]
    leftover = remaining - cap * len(long_ids)
    kept = [min(length, cap) for length in lengths]
    for i in long_ids[:leftover]:
        kept[i] += 1
    return kept


def tokenize(tokenizer, segments, max_length=None):
    """[bos] + tokens of each segment + [eos], fitted into max_length.

    segments: a string or a list of strings (tokenized separately, without
    special tokens, then concatenated).
    """
    if isinstance(segments, str):
        segments = [segments]
    bos_id, eos_id = special_ids(tokenizer)
    pieces = [list(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in segments]
    prefix = [] if bos_id is None else [bos_id]
    suffix = [] if eos_id is None else [eos_id]
    if max_length is not None:
        budget = max_length - len(prefix) - len(suffix)
        if budget < 0:
            raise ValueError(
                f"max_length={max_length} cannot even hold the special tokens "
                f"(bos={bos_id}, eos={eos_id}); raise max_length."
            )
        kept = _water_fill([len(p) for p in pieces], budget)
        pieces = [p[:k] for p, k in zip(pieces, kept)]
    return prefix + [t for p in pieces for t in p] + suffix


def _common_prefix_length(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _pad(seqs, length, pad_id):
    return [list(s) + [pad_id] * (length - len(s)) for s in seqs]


@gin.configurable
class Dataset(torch.utils.data.Dataset):
    """Base class of all datasets; construct it inside the dataset's gin scope.

    name: identifier (usually the gin scope), reported in batches as dataset_name.
    split: which split to load ("train", "validation", ...).
    batch_size: examples per batch (used by the batchers).
    dataset_path: optional location of the data (meaning is up to the subclass).
    seed: seed of the subset drawn when max_examples_per_dataset is set.
    max_examples_per_dataset: keep a random subset of at most this many examples.
    metrics: list of metric names (see colm.datasets.metrics).
    max_length: token budget of inputs and of targets / answer choices.
    """

    def __init__(
        self,
        name,
        split,
        batch_size,
        dataset_path=None,
        seed=42,
        max_examples_per_dataset=None,
        metrics=None,
        max_length=None,
    ):
        self.name = name
        self.split = split
        self.batch_size = batch_size
        self.dataset_path = dataset_path
        self.seed = seed
        if max_examples_per_dataset is not None and (
                isinstance(max_examples_per_dataset, bool) or not isinstance(max_examples_per_dataset, int)
                or max_examples_per_dataset < 1):
            raise ValueError(f"{name}/{type(self).__name__}.max_examples_per_dataset={max_examples_per_dataset!r}: give "
                             "a positive number of examples, or None for all of them.")
        self.max_examples_per_dataset = max_examples_per_dataset
        self._truncation_reported = False
        self.metrics = list(metrics) if metrics is not None else []
        self.max_length = max_length
        self.tokenizer = None
        self.examples = None
        # Called inside the dataset's gin scope, so it picks up scoped bindings.
        self.interface_info = InterfaceInfo()
        self.load_data()
        self.process_data()
        self.truncate_dataset()
        self.check_interface()

    # ---- hooks for subclasses -------------------------------------------------
    def source_description(self):
        """Where the rows come from, for error messages (LocalDataset names its file)."""
        return f"its data (dataset_path={self.dataset_path!r})"

    def answer_choices_fix(self):
        """How to give a rank-classification dataset its answer choices, for the build-time check."""
        return (f"Give every example its answer choices (the \"answer_choices\" of get_example), or score generated "
                f'text instead: {self.name}/InterfaceInfo.interface = "gen".')

    def check_interface(self):
        """Build-time check: rank classification ("mc") scores each example's answer choices, so a dataset whose
        first example has none is refused now rather than after training, naming the scope, source and fix."""
        if self.interface_info.interface != "mc" or len(self) == 0:
            return
        if not list(self.get_example(0).get("answer_choices") or []):
            raise ValueError(
                f"Dataset {self.name!r} is scored by rank classification ({self.name}/InterfaceInfo.interface = "
                f'"mc"), but example 0 of {self.source_description()} has no answer choices. '
                + self.answer_choices_fix()
            )

    def load_data(self):
        raise NotImplementedError(f"{type(self).__name__} must implement load_data().")

    def process_data(self):
        pass

    def subset_indices(self):
        """Sorted random subset of indices to keep, or None to keep everything."""
        limit = self.max_examples_per_dataset
        if limit is None or len(self) <= limit:
            return None
        rng = np.random.default_rng(self.seed)
        return sorted(int(i) for i in rng.choice(len(self), size=limit, replace=False))

    def truncate_dataset(self):
        indices = self.subset_indices()
        if indices is not None:
            self.examples = [self.examples[i] for i in indices]

    def __len__(self):
        if self.examples is None:
            raise NotImplementedError(f"{type(self).__name__} keeps no self.examples; implement __len__.")
        return len(self.examples)

    def get_example(self, i):
        return dict(self.examples[i])

    # ---- tokenization ---------------------------------------------------------
    # Training reads each example once per epoch; a dataset of at most this many examples keeps the token ids
    # of the examples it has read (a few bytes per token) instead of tokenizing them again.
    TOKEN_CACHE_MAX_EXAMPLES = 200_000

    def set_tokenizer(self, tokenizer):
        self.tokenizer = tokenizer
        self._token_cache = {}

    def _token_ids(self, tok, ex, i):
        """(input ids, target ids, ids of each answer choice) of example i."""
        cache = getattr(self, "_token_cache", None)
        if cache is not None and i in cache:
            return cache[i]
        choices = list(ex.get("answer_choices") or [])
        ids = (self._input_ids(tok, ex["input_str"], i), tokenize(tok, ex["target_str"], self.max_length),
               [tokenize(tok, c, self.max_length) for c in choices])
        if cache is not None and len(self) <= self.TOKEN_CACHE_MAX_EXAMPLES:
            cache[i] = ids
        return ids

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise RuntimeError(f"Dataset {self.name!r}: call set_tokenizer() before reading items.")
        return self.tokenizer

    def __getitem__(self, i):
        tok = self._require_tokenizer()
        ex = self.get_example(i)
        missing = [k for k in ("input_str", "target_str") if k not in ex]
        if missing:
            raise KeyError(f"Dataset {self.name!r}: get_example({i}) lacks {missing}; it returned keys {sorted(ex)}.")
        choices = list(ex.get("answer_choices") or [])
        input_ids, target_ids, choice_ids = self._token_ids(tok, ex, i)
        label = ex.get("label")
        if label is not None:
            label = int(label)
            if choices and not 0 <= label < len(choices):
                raise ValueError(
                    f"Dataset {self.name!r} example {i}: label {label} is outside "
                    f"the {len(choices)} answer choices {choices}."
                )
        elif not choices:
            label = -1
        elif ex["target_str"] in choices:
            label = choices.index(ex["target_str"])
        else:
            overlaps = [_common_prefix_length(target_ids, c) for c in choice_ids]
            label = overlaps.index(max(overlaps))
        references = ex.get("references")
        return {
            "input_ids": list(input_ids),
            "target_ids": list(target_ids),
            "answer_choices_ids": [list(c) for c in choice_ids],
            "label": label,
            "input_str": ex["input_str"],
            "target_str": ex["target_str"],
            "answer_choices": choices,
            "references": list(references) if references is not None else [ex["target_str"]],
            "multi_label": ex.get("multi_label"),
            "idx": i,
            "dataset_name": self.name,
        }

    def _input_ids(self, tok, text, i):
        ids = tokenize(tok, text, self.max_length)
        if self.max_length is not None and len(ids) >= self.max_length and not getattr(self, "_truncation_reported", False):
            full = len(tokenize(tok, text))
            if full > self.max_length:
                self._truncation_reported = True
                print(f"[colm] {self.name}: example {i} has {full:,} input tokens, truncated to max_length="
                      f"{self.max_length} (bind {self.name}/{type(self).__name__}.max_length to change it); further "
                      "truncations are not reported.")
        return ids

    def pad_id(self):
        pad_id = self._require_tokenizer().pad_token_id
        if pad_id is None:
            raise ValueError(
                f"Tokenizer {type(self.tokenizer).__name__} has no pad token; set tokenizer.pad_token before batching."
            )
        return pad_id

    def collate(self, batch):
        pad_id = self.pad_id()
        out = {}
        for key in ("input_ids", "target_ids"):
            longest = max(len(ex[key]) for ex in batch)
            out[key] = torch.tensor(_pad([ex[key] for ex in batch], longest, pad_id), dtype=torch.long)
        num_choices = max(len(ex["answer_choices_ids"]) for ex in batch)
        if num_choices > 0:
            # A lone [pad] choice is a filler the model scores as +inf loss.
            all_choices = [
                list(ex["answer_choices_ids"]) + [[pad_id]] * (num_choices - len(ex["answer_choices_ids"]))
                for ex in batch
            ]
            longest = max(len(c) for choices in all_choices for c in choices)
            out["answer_choices_ids"] = torch.tensor(
                [_pad(choices, longest, pad_id) for choices in all_choices], dtype=torch.long
            )
        out["label"] = torch.tensor([ex["label"] for ex in batch], dtype=torch.long)
        skip = {"input_ids", "target_ids", "answer_choices_ids", "label"}
        for key in batch[0]:
            if key not in skip:
                out[key] = [ex[key] for ex in batch]
        return out

    def peek_stats(self, n=100):
        """Mean input/target token lengths over up to n evenly spaced examples."""
        tok = self._require_tokenizer()
        if len(self) == 0:
            return {"input_tokens": 0.0, "target_tokens": 0.0}
        indices = np.unique(np.linspace(0, len(self) - 1, num=min(n, len(self))).astype(int))
        examples = [self.get_example(int(i)) for i in indices]
        inputs = [len(tokenize(tok, ex["input_str"], self.max_length)) for ex in examples]
        targets = [len(tokenize(tok, ex["target_str"], self.max_length)) for ex in examples]
        return {"input_tokens": float(np.mean(inputs)), "target_tokens": float(np.mean(targets))}

    def __repr__(self):
        return f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, size={len(self)})"


class TableDataset(Dataset):
    """A dataset whose rows stay in `self.data` (a `datasets.Dataset`, or anything with len, [i] and
    select), read lazily in `get_example`; max_examples_per_dataset keeps an index subset, not a copy."""

    data = None

    def truncate_dataset(self):
        indices = self.subset_indices()
        if indices is not None:
            self.data = self.data.select(indices)

    def __len__(self):
        return len(self.data)

    def require_columns(self, columns, where):
        """Raises naming the missing columns of self.data (where: which file or source was read)."""
        missing = [c for c in columns if c not in self.data.column_names]
        if missing:
            raise KeyError(
                f"{type(self).__name__} {self.name!r}: {where} lacks column(s) {missing}; "
                f"columns: {self.data.column_names}."
            )
