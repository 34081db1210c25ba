"""P3 datasets: Hugging Face rows rendered through promptsource templates (T0's training mixture).

A `P3Dataset` keeps the split as an Arrow table and renders items on access. Items are (example,
template) pairs addressed by a flat index: with T templates, item f is example f // T under template
f % T, or, with round_robin_template, the N examples each under template i % T. A cap
(max_examples_per_dataset) draws distinct flat indices with numpy in O(cap) memory, never building
the N*T list.

Template selection (`include_templates`), in promptsource's `all_template_names` order, after
`ignore_templates`: "all"; "original" (templates whose metadata says original_task); a list of
names; or an integer k, the k-th original-task template (the per-template scopes D/<X>/EVAL/T<k>).

Templates that draw at random (jinja's `| choice`) are rendered under a seed fixed by (seed, flat
index), so an item reads the same every time.

The subclasses keep the original class names: most only say which raw field holds the references;
Duorc, AppReviews, Trec, CBK and Ludwig change loading or templates.
"""

import contextlib
import os
import random
import warnings

import gin
import numpy as np

from colm.datasets.dataset import Dataset
from colm.datasets.hub import load_hf_split, path_parts
from colm.datasets.local import DATA_DIR_ENV

NO_LABEL = "<NO LABEL>"
NO_INPUT = "<NO INPUT>"
# Seed of the shuffle that splits single-split sources (app_reviews, covid QA) into train and eval.
HOLDOUT_SHUFFLE_SEED = 1234


# (dataset parts, split, $COLM_DATA_DIR) -> datasets.Dataset. Per-template and per-split scopes of one
# source share its (memory-mapped) table instead of loading it again.
_SPLIT_CACHE = {}


def load_split_cached(parts, split):
    """load_hf_split, remembered for the life of the process (the rows are read-only here)."""
    key = (tuple(parts), split, os.environ.get(DATA_DIR_ENV))
    if key not in _SPLIT_CACHE:
        _SPLIT_CACHE[key] = load_hf_split(list(parts), split)
    return _SPLIT_CACHE[key]


def item_seed(seed, flat_index):
    """Seed of Python's `random` while the template of item `flat_index` renders."""
    return int(seed) * 1_000_003 + int(flat_index)


@contextlib.contextmanager
def seeded_python_random(seed):
    """Runs the block with `random` seeded, then restores the caller's random state."""
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


def select_template_names(catalogue, include_templates, ignore_templates=(), where=""):
    """Names chosen from catalogue = [(name, is_original)] in catalogue order (see module doc)."""
    names = [name for name, _ in catalogue]
    ignore = list(ignore_templates or [])
    unknown = [n for n in ignore if n not in names]
    if unknown:
        raise ValueError(f"{where}: ignore_templates names unknown templates {unknown}; available: {names}.")
    kept = [(name, original) for name, original in catalogue if name not in ignore]
    originals = [name for name, original in kept if original]
    if include_templates == "all":
        chosen = [name for name, _ in kept]
    elif include_templates == "original":
        chosen = originals
    elif isinstance(include_templates, int) and not isinstance(include_templates, bool):
        if not 0 <= include_templates < len(originals):
            raise ValueError(
                f"{where}: include_templates={include_templates} selects the k-th original-task template, "
                f"but there are {len(originals)} (after ignore_templates): {originals}."
            )
        chosen = [originals[include_templates]]
    elif isinstance(include_templates, (list, tuple)):
        unknown = [n for n in include_templates if n not in names]
        if unknown:
            raise ValueError(f"{where}: unknown template names {unknown} in include_templates; available: {names}.")
        chosen = [name for name, _ in kept if name in include_templates]
    else:
        raise ValueError(
            f"{where}: include_templates={include_templates!r} must be 'all', 'original', a list of template "
            "names or an integer k (the k-th original-task template)."
        )
    if not chosen:
        raise ValueError(
            f"{where}: include_templates={include_templates!r} with ignore_templates={ignore} selects no "
            f"template; available: {names}."
        )
    return chosen


def field_value(row, path):
    """row[path] where path may be dotted into nested dicts ("answers.text")."""
    value = row
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            raise KeyError(f"Field {path!r} is not in the row; its fields are {sorted(row)}.")
        value = value[key]
    return value


def as_string_list(value):
    """A flat list of strings: a string becomes [string], nested lists are flattened."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in as_string_list(v)]
    return [str(value)]


def holdout_indices(num_rows, part, eval_size, seed=HOLDOUT_SHUFFLE_SEED):
    """Rows of one part of a split shuffled with RandomState(seed): "eval" = the first eval_size, "train" = the rest."""
    if part not in ("train", "eval"):
        raise ValueError(f"part={part!r}: set it to 'train' or 'eval' (which slice of the shuffled split to keep).")
    order = np.random.RandomState(seed).permutation(num_rows)
    return order[:eval_size] if part == "eval" else order[eval_size:]


def promptsource_templates():
    """The promptsource.templates module, imported on first use without its pkg_resources warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
        from promptsource import templates
    return templates


class CompiledTemplate:
    """A promptsource Template whose jinja is compiled once.

    promptsource's Template.apply compiles its jinja on every call (milliseconds per item); this renders
    the same way (fields truncated to TEXT_VAR_LENGTH characters, "|||" inside fields protected, the
    answer choices available to the prompt as `answer_choices`) from templates compiled here once. The
    answer choices are rendered once per item and are the ones the prompt saw.
    """

    def __init__(self, template):
        ps = promptsource_templates()
        self.name = template.name
        self._protect, self._unprotect = ps.Template._escape_pipe, ps.Template._unescape_pipe
        # Without constant folding: jinja would otherwise draw `[0, 1, 2, 3] | choice` once, at compile time.
        environment = ps.env.overlay(optimized=False)
        truncated = template.jinja.replace("}}", f" | string | truncate({ps.TEXT_VAR_LENGTH}) }}}}")
        self._prompt = environment.from_string(truncated)
        expr = template.get_answer_choices_expr()
        self._choices = environment.from_string(expr) if expr is not None else None

    def render(self, row):
        """(parts split at "|||", answer choices or None)."""
        protected = self._protect(row)
        if "answer_choices" in protected:
            raise ValueError("The row has a field named 'answer_choices', which promptsource reserves.")
        choices = None
        if self._choices is not None:
            choices = [self._unprotect(c.strip()) for c in self._choices.render(**protected).split("|||")]
        text = self._prompt.render(**protected, answer_choices=choices)
        return [self._unprotect(part).strip() for part in text.split("|||")], choices


_CATALOGUES = {}


def promptsource_catalogue(parts):
    """[(name, CompiledTemplate, is_original)] of promptsource's templates for (name[, config]), cached."""
    key = tuple(parts)
    if key not in _CATALOGUES:
        collection = promptsource_templates().DatasetTemplates(*parts)
        _CATALOGUES[key] = [
            (name, CompiledTemplate(collection[name]), bool(collection[name].metadata.original_task))
            for name in collection.all_template_names
        ]
    return _CATALOGUES[key]


class PlainTemplate:
    """A template written in Python: render(row) -> ([input, target], answer choices or None)."""

    def __init__(self, name, render, answer_choices=None):
        self.name = name
        self._render = render
        self.answer_choices = list(answer_choices) if answer_choices else None

    def render(self, row):
        return list(self._render(row)), (list(self.answer_choices) if self.answer_choices else None)


@gin.configurable
class P3Dataset(Dataset):
    """A Hugging Face dataset rendered through promptsource templates.

    dataset_path: (name,) or (name, config), as promptsource and the hub name them (a leading
      "huggingface" is accepted); loaded with colm.datasets.hub.load_hf_split.
    include_templates / ignore_templates: which templates (module doc).
    round_robin_template: one item per example (template i % T) instead of every pair.
    max_pretemplate_examples_per_dataset: random subset of raw examples, drawn before templating.
    max_examples_per_dataset: random subset of items (example, template pairs).
    references_field: raw field (dotted for nested) whose value is each item's references; default the
      target string.
    answer_start_field: raw field kept as `_answer_start` (squad-style data).
    """

    default_references_field = None
    default_answer_start_field = None

    def __init__(
        self,
        name,
        split,
        batch_size,
        dataset_path=None,
        include_templates="original",
        ignore_templates=(),
        round_robin_template=False,
        max_pretemplate_examples_per_dataset=None,
        references_field=None,
        answer_start_field=None,
        seed=42,
        max_examples_per_dataset=None,
        metrics=None,
        max_length=None,
    ):
        self.include_templates = include_templates
        self.ignore_templates = list(ignore_templates or [])
        self.round_robin_template = round_robin_template
        self.max_pretemplate_examples_per_dataset = max_pretemplate_examples_per_dataset
        self.references_field = references_field or self.default_references_field
        self.answer_start_field = answer_start_field or self.default_answer_start_field
        self.data = None
        self.templates = []  # [(name, template)] in use
        self.item_ids = None  # sorted flat indices kept by max_examples_per_dataset, or None for all
        self._warned = set()
        super().__init__(
            name=name,
            split=split,
            batch_size=batch_size,
            dataset_path=dataset_path,
            seed=seed,
            max_examples_per_dataset=max_examples_per_dataset,
            metrics=metrics,
            max_length=max_length,
        )

    # ---- loading --------------------------------------------------------------------------------
    def where(self):
        return f"{type(self).__name__} {self.name!r} ({'/'.join(path_parts(self.dataset_path))})"

    def load_rows(self):
        """The split as a `datasets.Dataset`."""
        return load_split_cached(path_parts(self.dataset_path), self.split)

    def template_catalogue(self):
        """[(name, template, is_original)] of every template available, in promptsource order."""
        catalogue = promptsource_catalogue(path_parts(self.dataset_path))
        if not catalogue:
            raise ValueError(f"{self.where()}: promptsource has no templates for {path_parts(self.dataset_path)}.")
        return catalogue

    def load_data(self):
        if not path_parts(self.dataset_path):
            raise ValueError(f"{type(self).__name__} {self.name!r}: set P3Dataset.dataset_path, e.g. ['super_glue', 'rte'].")
        self.catalogue = self.template_catalogue()
        chosen = select_template_names(
            [(name, original) for name, _, original in self.catalogue],
            self.include_templates,
            self.ignore_templates,
            where=self.where(),
        )
        by_name = {name: template for name, template, _ in self.catalogue}
        self.templates = [(name, by_name[name]) for name in chosen]
        self.data = self.load_rows()

    def truncate_dataset(self):
        cap = self.max_pretemplate_examples_per_dataset
        if cap is not None and len(self.data) > cap:
            rng = np.random.default_rng(self.seed)
            self.data = self.data.select(np.sort(rng.choice(len(self.data), size=cap, replace=False)))
        cap = self.max_examples_per_dataset
        if cap is not None and self.num_items() > cap:
            rng = np.random.default_rng(self.seed)
            # numpy draws without replacement in O(cap) memory (a hash set), never materialising N*T indices.
            self.item_ids = np.sort(rng.choice(self.num_items(), size=cap, replace=False))

    # ---- indexing -------------------------------------------------------------------------------
    def num_items(self):
        """Items before max_examples_per_dataset: N (round robin) or N*T."""
        return len(self.data) * (1 if self.round_robin_template else len(self.templates))

    def __len__(self):
        return len(self.item_ids) if self.item_ids is not None else self.num_items()

    def locate(self, i):
        """(flat index, example index, template index) of item i."""
        if not 0 <= i < len(self):
            raise IndexError(f"{self.where()}: item {i} out of range (size {len(self)}).")
        flat = int(self.item_ids[i]) if self.item_ids is not None else int(i)
        num_templates = len(self.templates)
        if self.round_robin_template:
            return flat, flat, flat % num_templates
        return flat, flat // num_templates, flat % num_templates

    # ---- rendering ------------------------------------------------------------------------------
    def _warn_once(self, key, message):
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"{self.where()}: {message} (warned once)", stacklevel=3)

    def render(self, template_name, template, row, seed):
        """(input_str, target_str, answer_choices) of one row under one template."""
        try:
            with seeded_python_random(seed):
                parts, choices = template.render(row)
            choices = choices or []
        except Exception as error:  # a template that cannot render this row: the original falls back too
            self._warn_once(("error", template_name), f"template {template_name!r} failed ({error!r}); using {NO_INPUT}")
            return NO_INPUT, NO_INPUT, []
        if len(parts) != 2:
            self._warn_once(("parts", template_name), f"template {template_name!r} rendered {len(parts)} parts; using {NO_INPUT}")
            return NO_INPUT, NO_INPUT, list(choices)
        input_str, target_str = parts
        return input_str, (target_str if target_str else NO_LABEL), list(choices)

    def prepare_row(self, row, example_index):
        """Hook: the row the templates see."""
        return row

    def references(self, row, example_index, template_index, target_str):
        """Flat list of reference strings of one item."""
        if self.references_field is None:
            return [target_str]
        return as_string_list(field_value(row, self.references_field))

    def get_example(self, i):
        flat, example_index, template_index = self.locate(i)
        row = self.prepare_row(self.data[example_index], example_index)
        template_name, template = self.templates[template_index]
        input_str, target_str, choices = self.render(template_name, template, row, item_seed(self.seed, flat))
        example = {f"_{key}": value for key, value in row.items()}
        example.update(
            input_str=input_str,
            target_str=target_str,
            answer_choices=choices,
            references=self.references(row, example_index, template_index, target_str),
            template_name=template_name,
        )
        if choices and target_str in choices:
            example["label"] = choices.index(target_str)
        if self.answer_start_field is not None:
            example["_answer_start"] = list(field_value(row, self.answer_start_field))
        return example


def _references_variant(class_name, references_field, answer_start_field=None, doc=""):
    """A registered P3Dataset subclass that only sets where the references come from."""
    cls = type(
        class_name,
        (P3Dataset,),
        {
            "__doc__": f"P3Dataset whose references are the raw {references_field!r}. {doc}".strip(),
            "__module__": __name__,
            "default_references_field": references_field,
            "default_answer_start_field": answer_start_field,
        },
    )
    return gin.configurable(cls)


P3AdversarialQADataset = _references_variant("P3AdversarialQADataset", "answers.text", "answers.answer_start")
P3QuorefDataset = _references_variant("P3QuorefDataset", "answers.text", "answers.answer_start")
P3RopesDataset = _references_variant("P3RopesDataset", "answers.text")
P3CommonGenDataset = _references_variant("P3CommonGenDataset", "target")
P3MultinewsDataset = _references_variant("P3MultinewsDataset", "summary")
P3SamsumDataset = _references_variant("P3SamsumDataset", "summary")
P3XSumDataset = _references_variant("P3XSumDataset", "summary")
P3GigaWordDataset = _references_variant("P3GigaWordDataset", "summary")
P3HotpotQADataset = _references_variant("P3HotpotQADataset", "answer")
P3WikiBioDataset = _references_variant("P3WikiBioDataset", "target_text")
P3CNNDailyMailDataset = _references_variant("P3CNNDailyMailDataset", "highlights")
P3WebQuestionsDataset = _references_variant("P3WebQuestionsDataset", "answers")


@gin.configurable
class P3StoryClozeDataset(P3Dataset):
    """Story Cloze 2016: no hub copy, so load_hf_split reads it from $COLM_DATA_DIR/story_cloze/2016."""


@gin.configurable
class P3DuorcDataset(P3Dataset):
    """DuoRC: rows without an answer are rendered with no_answer=True, and their reference is the
    "no answer" phrase of the item's template if it is an original-task one, else of the original-task
    template picked cyclically by example index."""

    default_references_field = "answers"

    @staticmethod
    def unanswerable(row):
        return bool(row.get("no_answer")) or not row.get("answers")

    def prepare_row(self, row, example_index):
        return dict(row, no_answer=True) if self.unanswerable(row) else row

    def references(self, row, example_index, template_index, target_str):
        if not self.unanswerable(row):
            return as_string_list(row["answers"])
        template_name, _ = self.templates[template_index]
        originals = [(name, t) for name, t, original in self.catalogue if original and name not in self.ignore_templates]
        if any(name == template_name for name, _ in originals):
            return [target_str]
        name, template = originals[example_index % len(originals)]
        return [self.render(name, template, row, item_seed(self.seed, example_index))[1]]


@gin.configurable
class P3AppReviewsDataset(P3Dataset):
    """app_reviews has one split: shuffled with RandomState(1234), part "eval" keeps the first
    eval_size rows and part "train" the rest (kept as an index mapping, not a copy)."""

    def __init__(self, *args, part=None, eval_size=10_000, **kwargs):
        self.part = part
        self.eval_size = eval_size
        super().__init__(*args, **kwargs)

    def process_data(self):
        try:
            keep = holdout_indices(len(self.data), self.part, self.eval_size)
        except ValueError as error:
            raise ValueError(f"{self.where()}: P3AppReviewsDataset.{error}") from None
        self.data = self.data.select(keep)


# The 50 fine question classes of TREC, in the order of the hub dataset's `fine_label` ClassLabel.
TREC_FINE_LABELS = (
    "ABBR:abb", "ABBR:exp",
    "ENTY:animal", "ENTY:body", "ENTY:color", "ENTY:cremat", "ENTY:currency", "ENTY:dismed", "ENTY:event",
    "ENTY:food", "ENTY:instru", "ENTY:lang", "ENTY:letter", "ENTY:other", "ENTY:plant", "ENTY:product",
    "ENTY:religion", "ENTY:sport", "ENTY:substance", "ENTY:symbol", "ENTY:techmeth", "ENTY:termeq", "ENTY:veh",
    "ENTY:word",
    "DESC:def", "DESC:desc", "DESC:manner", "DESC:reason",
    "HUM:gr", "HUM:ind", "HUM:title", "HUM:desc",
    "LOC:city", "LOC:country", "LOC:mount", "LOC:other", "LOC:state",
    "NUM:code", "NUM:count", "NUM:date", "NUM:dist", "NUM:money", "NUM:ord", "NUM:other", "NUM:period",
    "NUM:perc", "NUM:speed", "NUM:temp", "NUM:volsize", "NUM:weight",
)  # fmt: skip


def trec_fine_label(row):
    value = row["fine_label"]
    return value if isinstance(value, str) else TREC_FINE_LABELS[int(value)]


def _render_trec(row):
    return (
        f"Question: {row['text']}\nAnswer choices: {', '.join(TREC_FINE_LABELS)}\nAnswer:",
        trec_fine_label(row),
    )


@gin.configurable
class P3TrecDataset(P3Dataset):
    """TREC with one fixed template: the question and the 50 fine classes; the target is the fine class
    (fields text / coarse_label / fine_label of the hub dataset). include_templates is not used."""

    def template_catalogue(self):
        return [("fine_label_choices", PlainTemplate("fine_label_choices", _render_trec, TREC_FINE_LABELS), True)]

    def load_data(self):
        self.include_templates, self.ignore_templates = "all", []
        super().load_data()


@gin.configurable
class CBKGenDataset(P3Dataset):
    """CT0 generation tasks read from local JSON lines with fields src (prompt, instruction included)
    and tgt; references = [tgt]. dataset_path = ["ct0_data", <task>] under $COLM_DATA_DIR.

    part / eval_size: when set, shuffle the split with RandomState(1234) and keep the first eval_size
    rows ("eval") or the rest ("train").
    """

    default_references_field = "tgt"

    def __init__(self, *args, part=None, eval_size=None, **kwargs):
        self.part = part
        self.eval_size = eval_size
        super().__init__(*args, **kwargs)

    def load_rows(self):
        rows = super().load_rows()  # local only: colm.datasets.hub.LOCAL_ONLY says where the files go
        missing = [f for f in ("src", "tgt") if f not in rows.column_names]
        if missing:
            raise KeyError(f"{self.where()}: the local rows lack fields {missing}; columns: {rows.column_names}.")
        return rows

    def template_catalogue(self):
        return [("src_tgt", PlainTemplate("src_tgt", lambda row: (row["src"], row["tgt"])), True)]

    def process_data(self):
        if self.part is not None:
            self.data = self.data.select(holdout_indices(len(self.data), self.part, self.eval_size))


@gin.configurable
class CovidqaDataset(CBKGenDataset):
    """CT0 covid QA: one file, shuffled with RandomState(1234); the first 500 rows are the eval part."""

    def __init__(self, *args, eval_size=500, **kwargs):
        super().__init__(*args, eval_size=eval_size, **kwargs)


def _yes_no(implicature):
    answer = str(implicature).strip().lower().rstrip(".!")
    if answer not in ("yes", "no"):
        raise ValueError(f"Ludwig implicature {implicature!r} is neither yes nor no.")
    return answer


def _ludwig_template(name, prompt):
    return PlainTemplate(name, lambda row: (prompt.format(**row), _yes_no(row["implicature"])), ("yes", "no"))


# Six phrasings of the same question: does the response to the utterance mean yes or no?
LUDWIG_PROMPTS = (
    ("question_response", "Question: {utterance}\nResponse: {response}\nDoes the response mean yes or no?"),
    ("alice_bob", 'Alice asks: "{utterance}"\nBob replies: "{response}"\nIs Bob saying yes or no?'),
    ("asked_responded", 'Esther asked "{utterance}" and Juan responded "{response}". Did Juan mean yes or no?'),
    ("exchange", "{utterance}\n{response}\nIn this exchange, is the answer to the question yes or no?"),
    ("reply_implies", 'Someone asked "{utterance}" and the reply was "{response}". Does the reply imply yes or no?'),
    ("speaker_b", "A: {utterance}\nB: {response}\nWhat does B mean, yes or no?"),
)


@gin.configurable
class LudwigDataset(P3Dataset):
    """LUDWIG conversational implicatures (UCL-DARK/ludwig: utterance, response, implicature) under six
    yes/no templates; the target is the implicature as "yes" or "no"."""

    def template_catalogue(self):
        return [(name, _ludwig_template(name, prompt), True) for name, prompt in LUDWIG_PROMPTS]
