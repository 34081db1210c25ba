"""Natural Instructions v2 task -> category, for the per-category NIV2 experts (spec 6.7, indices 72-146).

The original code never shipped how its `FLANV2/NIV2/<Category>` folders were made, so the rule is ours:
**an NIV2 task belongs to the first entry of the "Categories" list in its task file**
(`tasks/<task_name>.json` of the allenai/natural-instructions repository). Category names are matched to
`NIV2_CATEGORIES` without regard to case or surrounding spaces, and the registry's spelling is kept.

The mapping comes from either source:
  * `categories_from_tasks_dir(dir)`: a local checkout of natural-instructions `tasks/` (one JSON per task);
  * `categories_from_mapping_file(path)`: a TSV (`task_name<TAB>category` per line; an optional header
    line whose first field is `task`, `task_name` or `name`; `#` comments) or a JSON object
    `{task_name: category}` (a list value counts by its first element).
Task names are looked up as given, without a trailing ".json", and finally by their `taskNNN` number.
"""

import json
import os
import re

# The 75 NIV2 category folders, in expert order (Niv2zsTranslation ... Niv2zsMisc).
NIV2_CATEGORIES = (
    "Translation", "Program Execution", "Question Generation", "Sentiment Analysis", "Text Categorization",
    "Text Matching", "Toxic Language Detection", "Cause Effect Classification", "Information Extraction",
    "Textual Entailment", "Wrong Candidate Generation", "Named Entity Recognition", "Commonsense Classification",
    "Fill in The Blank", "Text Completion", "Sentence Composition", "Title Generation", "Language Identification",
    "Question Understanding", "Sentence Perturbation", "Answerability Classification", "Summarization",
    "Coreference Resolution", "Text Quality Evaluation", "Text to Code", "Paraphrasing", "Dialogue Generation",
    "Question Rewriting", "Word Semantics", "Pos Tagging", "Linguistic Probing", "Story Composition",
    "Speaker Identification", "Word Analogy", "Data to Text", "Stereotype Detection",
    "Negotiation Strategy Detection", "Dialogue Act Recognition", "Gender Classification",
    "Coherence Classification", "Explanation", "Ethics Classification", "Word Relation Classification",
    "Sentence Ordering", "Answer Verification", "Mathematics", "Intent Identification", "Keyword Tagging",
    "Code to Text", "Dialogue State Tracking", "Text Simplification", "Stance Detection", "Fact Verification",
    "Grammar Error Detection", "Section Classification", "Number Conversion", "Style Transfer",
    "Speaker Relation Classification", "Irony Detection", "Question Decomposition", "Overlap Extraction",
    "Grammar Error Correction", "Spelling Error Detection", "Entity Generation", "Sentence Expansion",
    "Discourse Connective Identification", "Discourse Relation Classification", "Poem Generation",
    "Entity Relation Classification", "Punctuation Error Detection", "Spam Classification", "Paper Review",
    "Sentence Compression", "Preposition Prediction", "Misc.",
)

_BY_KEY = {c.strip().lower(): c for c in NIV2_CATEGORIES}
_TASK_NUMBER = re.compile(r"^(task\d+)(?:_|$)")
# "Categories" sits near the top of a task file, before the (possibly huge) instances.
_CATEGORIES_FIELD = re.compile(r'"Categories"\s*:\s*(\[[^\]]*\])')
_HEAD_BYTES = 1 << 16


def canonical_category(name: str) -> str:
    """The registry's spelling of a category (case-insensitive match), else the name stripped."""
    return _BY_KEY.get(name.strip().lower(), name.strip())


def _task_key(task_name: str) -> str:
    name = task_name.strip()
    return name[: -len(".json")] if name.endswith(".json") else name


def _first_category(categories, where: str) -> str:
    if isinstance(categories, str):
        categories = [categories]
    if not categories or not isinstance(categories[0], str) or not categories[0].strip():
        raise ValueError(f"{where}: empty or malformed category {categories!r}.")
    return canonical_category(categories[0])


def _categories_of_task_file(path: str):
    """First category of one task JSON; reads only its head unless "Categories" comes late."""
    with open(path, encoding="utf-8") as f:
        head = f.read(_HEAD_BYTES)
    match = _CATEGORIES_FIELD.search(head)
    if match:
        return json.loads(match.group(1))
    with open(path, encoding="utf-8") as f:
        return json.load(f).get("Categories")


def categories_from_tasks_dir(tasks_dir: str) -> dict:
    """{task name: first category} from a natural-instructions `tasks/` checkout (files task*.json)."""
    if not os.path.isdir(tasks_dir):
        raise FileNotFoundError(
            f"NIV2 tasks directory {tasks_dir!r} does not exist; pass the tasks/ folder of a checkout of "
            "https://github.com/allenai/natural-instructions (or a --niv2_categories TSV/JSON instead)."
        )
    mapping = {}
    for entry in sorted(os.listdir(tasks_dir)):
        if not (entry.startswith("task") and entry.endswith(".json")):
            continue
        path = os.path.join(tasks_dir, entry)
        categories = _categories_of_task_file(path)
        if categories is None:
            raise ValueError(f"NIV2 task file {path!r} has no \"Categories\" field.")
        mapping[_task_key(entry)] = _first_category(categories, path)
    if not mapping:
        raise ValueError(f"No task*.json files in {tasks_dir!r}; is it the tasks/ folder of natural-instructions?")
    return mapping


def categories_from_mapping_file(path: str) -> dict:
    """{task name: category} from a TSV (task<TAB>category) or JSON ({task: category or [categories]})."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"NIV2 category mapping {path!r} does not exist.")
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict):
            raise ValueError(f"{path!r} must hold a JSON object {{task_name: category}}.")
        return {_task_key(k): _first_category(v, f"{path!r} entry {k!r}") for k, v in data.items()}
    mapping = {}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            line = line.rstrip("\n")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            fields = line.split("\t")
            if len(fields) < 2:
                raise ValueError(f"{path}:{line_no}: expected 'task_name<TAB>category', got {line!r}.")
            if not mapping and fields[0].strip().lower() in ("task", "task_name", "name"):
                continue  # header
            mapping[_task_key(fields[0])] = _first_category(fields[1], f"{path}:{line_no}")
    return mapping


class CategoryLookup:
    """task name -> category, by exact name, name without ".json", or `taskNNN` number; None if unknown."""

    def __init__(self, mapping: dict):
        self.mapping = dict(mapping)
        self.by_number = {}
        for task, category in self.mapping.items():
            match = _TASK_NUMBER.match(task)
            if match:
                self.by_number.setdefault(match.group(1), category)

    def __call__(self, task_name: str):
        key = _task_key(task_name)
        if key in self.mapping:
            return self.mapping[key]
        match = _TASK_NUMBER.match(key)
        return self.by_number.get(match.group(1)) if match else None
