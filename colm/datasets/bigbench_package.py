"""BIG-bench tasks read offline from the `bigbench` PyPI package, in the rows of the hub datasets.

The package ships every JSON task as `benchmark_tasks/<task>/task.json` (a container task keeps its
subtasks in `<task>/<subtask>/task.json`) and a few programmatic tasks as `task.py`. Its `__init__` and
`api/json_task.py` pull in TensorFlow, so nothing here imports it: the package is located with
`importlib.util.find_spec` (or the `COLM_BIGBENCH_DIR` override) and its JSON files are read directly.

JSON tasks become `tasksource/bigbench` rows (idx, inputs, targets, multiple_choice_targets,
multiple_choice_scores). tasksource/bigbench is a copy of the Hugging Face `bigbench` builder's output,
which runs each (sub)task through BIG-bench's own formatting and its seqio "huggingface" export:
  * examples are de-duplicated (first copy kept, compared as JSON text);
  * input = task_prefix + example_input_prefix ("\\nQ: ") + input
            [+ choice_prefix ("\\n  choice: ") before each answer choice, choices sorted then permuted by
               numpy RandomState(42) created afresh for every example, if append_choices_to_input]
            + example_output_prefix ("\\nA: "); the builder strips the result (and every target);
  * targets = the example's target (a string becomes a one-element list), else the first choice with
    the highest score; multiple_choice_targets / _scores = target_scores in file order, scores as int32;
  * splits: a (sub)task's examples are shuffled with Python's random.seed(42); the last
    max(int(0.2 n), m) form validation, the rest train, with m = 16, or 16 // (number of subtasks) for
    each subtask of a container; idx counts from 0 within each (sub)task's split; a container's split
    is its subtasks' splits in order (subtask files sorted by path).
This module re-implements those rules; it shares no code with the package.

Programmatic tasks (boolean_expressions, web_of_lies, multistep_arithmetic) only generate examples
inside `evaluate_model`; `generate_bbh_rows` runs that with a recording stand-in for the model and
returns `lukaemon/bbh`-style rows (input, target). Their task.py imports only `bigbench.api.task`
(standard library), so this needs no heavy dependency, but it yields BIG-bench's generated examples,
not the BBH test set.
"""

import ast
import contextlib
import hashlib
import importlib.util
import json
import operator
import os
import random
import sys

import numpy as np

PACKAGE_ENV = "COLM_BIGBENCH_DIR"
INSTALL_HINT = (
    "Install it with `bash exp_launch/install_bigbench.sh` (pip cannot install bigbench==1.0.0 directly), "
    f"or point {PACKAGE_ENV} at a `bigbench` package folder (or its benchmark_tasks folder)."
)

# The defaults of BIG-bench's JSON task format (bigbench/api/json_task.py).
DEFAULT_INPUT_PREFIX = "\nQ: "
DEFAULT_OUTPUT_PREFIX = "\nA: "
DEFAULT_CHOICE_PREFIX = "\n  choice: "
FORMAT_SEED = 42  # the JsonTask random_seed that permutes appended choices
SPLIT_SEED = 42  # seqio bridge: random.seed before shuffling a (sub)task
VALIDATION_FRACTION = 0.2
MIN_VALIDATION_EXAMPLES = 16
SPLITS = ("train", "validation", "train_validation", "all")


# ---- locating the package -------------------------------------------------------------------------


def tasks_root():
    """The `benchmark_tasks` folder of the bigbench package, or None if there is none."""
    override = os.environ.get(PACKAGE_ENV)
    if override:
        path = os.path.abspath(os.path.expanduser(override))
        if os.path.isdir(os.path.join(path, "benchmark_tasks")):
            return os.path.join(path, "benchmark_tasks")
        if os.path.isdir(path):
            return path
        raise FileNotFoundError(f"{PACKAGE_ENV}={override!r} is not a folder. {INSTALL_HINT}")
    try:
        spec = importlib.util.find_spec("bigbench")  # finds a top-level package without running it
    except (ImportError, ValueError):
        spec = None
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = os.path.join(location, "benchmark_tasks")
        if os.path.isdir(candidate):
            return candidate
    return None


def package_available():
    return tasks_root() is not None


def require_tasks_root():
    root = tasks_root()
    if root is None:
        raise ModuleNotFoundError(f"The BIG-bench package (bigbench) is not installed. {INSTALL_HINT}")
    return root


def task_dir(task):
    root = require_tasks_root()
    path = os.path.join(root, task)
    if not os.path.isdir(path):
        import difflib

        names = sorted(n for n in os.listdir(root) if os.path.isdir(os.path.join(root, n)))
        close = difflib.get_close_matches(task, names, n=3)
        raise FileNotFoundError(
            f"BIG-bench task {task!r} is not in {root}" + (f"; did you mean {close}?" if close else ".")
        )
    return path


# ---- JSON tasks -----------------------------------------------------------------------------------


class Subtask:
    """One (sub)task with examples: its formatting options and its distinct raw examples."""

    def __init__(self, name, data, path):
        self.name = name
        self.path = path
        self.task_prefix = str(data.get("task_prefix", ""))
        self.input_prefix = data.get("example_input_prefix", DEFAULT_INPUT_PREFIX)
        self.output_prefix = data.get("example_output_prefix", DEFAULT_OUTPUT_PREFIX)
        self.choice_prefix = data.get("choice_prefix", DEFAULT_CHOICE_PREFIX)
        # Plain truthiness, as BIG-bench does: logic_grid_puzzle writes the string "false" (so: appended).
        self.append_choices = bool(data.get("append_choices_to_input", True))
        self.examples = _distinct(data["examples"])

    def __len__(self):
        return len(self.examples)

    def row(self, position, idx):
        row = format_example(self.examples[position], self, where=f"{self.path} example {position}")
        row["idx"] = int(idx)
        return row


def _distinct(examples):
    seen, kept = set(), []
    for example in examples:
        key = hashlib.blake2b(json.dumps(example).encode("utf-8"), digest_size=16).digest()
        if key not in seen:
            seen.add(key)
            kept.append(example)
    return kept


def read_json_task(task):
    """The (sub)tasks of a BIG-bench JSON task: [Subtask], one for a plain task, sorted for a container."""
    folder = task_dir(task)
    main = os.path.join(folder, "task.json")
    if not os.path.isfile(main):
        if os.path.isfile(os.path.join(folder, "task.py")):
            raise ValueError(
                f"BIG-bench task {task!r} is programmatic (task.py, no task.json): it has no tasksource/bigbench "
                "rows. Its BBH version is BigBenchSampleDataset (lukaemon/bbh)."
            )
        raise FileNotFoundError(f"BIG-bench task {task!r} has no task.json in {folder}.")
    with open(main, encoding="utf-8") as f:
        data = json.load(f)
    if "examples" in data:
        return [Subtask(task, data, main)]
    paths = sorted(
        os.path.join(folder, d, "task.json") for d in os.listdir(folder) if os.path.isfile(os.path.join(folder, d, "task.json"))
    )
    if not paths:
        raise ValueError(f"BIG-bench task {main} has neither examples nor subtask folders.")
    subtasks = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            sub = json.load(f)
        if "examples" not in sub:
            raise ValueError(f"BIG-bench subtask {path} has no examples.")
        subtasks.append(Subtask(f"{task}:{sub.get('name', os.path.basename(os.path.dirname(path)))}", sub, path))
    return subtasks


def format_example(example, options, where="example"):
    """One task.json example as a tasksource/bigbench row (without idx); see the module docstring."""
    text = example["input"]
    scores = example.get("target_scores")
    if scores is not None:
        if options.append_choices:
            names = sorted(scores)
            order = np.random.RandomState(FORMAT_SEED).permutation(len(names))
            text = text + options.choice_prefix + options.choice_prefix.join(names[k] for k in order)
        if "target" in example:
            target = example["target"]
        else:
            best, worst = max(scores.values()), min(scores.values())
            if (len(scores) == 1 and best == 0) or (len(scores) > 1 and best <= worst):
                raise ValueError(f"BIG-bench {where}: no choice scores higher than the others: {dict(scores)}")
            target = next(choice for choice, score in scores.items() if score == best)
    elif "target" in example:
        target = example["target"]
    else:
        raise ValueError(f"BIG-bench {where} has neither 'target' nor 'target_scores'.")
    targets = target if isinstance(target, list) else [target]
    inputs = options.task_prefix + options.input_prefix + text + options.output_prefix
    return {
        "inputs": inputs.strip(),
        "targets": [str(t).strip() for t in targets],
        "multiple_choice_targets": [str(c).strip() for c in (scores or {})],
        "multiple_choice_scores": [int(s) for s in (scores or {}).values()],
    }


def split_positions(n, split, min_validation=MIN_VALIDATION_EXAMPLES, where="task"):
    """Example positions of a (sub)task's split, in the split's order (the seqio bridge's slicing)."""
    if split == "all":
        return list(range(n))
    order = list(range(n))
    random.Random(SPLIT_SEED).shuffle(order)  # the same permutation as random.seed(42); random.shuffle
    num_validation = max(int(VALIDATION_FRACTION * n), min_validation)
    if num_validation >= n:
        raise ValueError(
            f"BIG-bench {where} has too few examples ({n}) for a train/validation split (it needs more than "
            f"{min_validation}); the hub has no such split either. Use split 'all'."
        )
    return order[: n - num_validation] if split == "train" else order[n - num_validation :]


class PackageTaskRows:
    """A split of a BIG-bench JSON task as lazily formatted tasksource/bigbench rows.

    Holds the raw examples once and an index (subtask, example position, idx) per row; `rows[i]` formats
    row i on demand; `select(indices)` keeps a subset, like `datasets.Dataset.select`.
    """

    column_names = ["idx", "inputs", "targets", "multiple_choice_targets", "multiple_choice_scores"]

    def __init__(self, subtasks, index):
        self.subtasks = subtasks
        self.index = index  # int array (num_rows, 3)

    @classmethod
    def load(cls, task, split):
        if split not in SPLITS:
            raise ValueError(f"BIG-bench split {split!r} is not one of {list(SPLITS)}.")
        subtasks = read_json_task(task)
        min_validation = MIN_VALIDATION_EXAMPLES if len(subtasks) == 1 else MIN_VALIDATION_EXAMPLES // len(subtasks)
        parts = ["train", "validation"] if split == "train_validation" else [split]
        index = []
        for part in parts:
            for s, subtask in enumerate(subtasks):
                positions = split_positions(len(subtask), part, min_validation, where=subtask.name)
                index.extend((s, p, idx) for idx, p in enumerate(positions))
        return cls(subtasks, np.asarray(index, dtype=np.int64).reshape(-1, 3))

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        s, position, idx = (int(v) for v in self.index[int(i)])
        return self.subtasks[s].row(position, idx)

    def select(self, indices):
        return PackageTaskRows(self.subtasks, self.index[np.asarray(list(indices), dtype=np.int64)])


# ---- programmatic tasks (BBH versions) ------------------------------------------------------------

# BBH task -> (package task folder, constructor arguments): zero-shot, otherwise the task.py defaults;
# multistep_arithmetic_two is BBH's shape, two parenthesised pairs: "((a op b) op (c op d)) =".
PROGRAMMATIC_BBH = {
    "boolean_expressions": ("boolean_expressions", {"num_shots": 0}),
    "web_of_lies": ("web_of_lies", {"num_shots": 0}),
    "multistep_arithmetic_two": ("multistep_arithmetic", {"depth_level_list": ([2],), "lengths": [2]}),
}


class _RecordingModel:
    """Stands in for a BIG-bench model: remembers the prompts a programmatic task asks about."""

    def __init__(self):
        self.prompts = []

    def cond_log_prob(self, inputs, targets, **kwargs):
        self.prompts.extend(inputs)
        return [[0.0] * len(t) for t in targets]

    def generate_text(self, inputs, **kwargs):
        self.prompts.extend(inputs)
        return [""] * len(inputs)


_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Not: operator.not_}


def evaluate_expression(text):
    """Value of a Boolean (True/False, not, and, or) or integer (+, -, *) expression, parsed, never eval'd."""

    def walk(node):
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (bool, int)):
            return node.value
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](walk(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            return _BINARY[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.BoolOp):
            values = [walk(v) for v in node.values]
            result = values[0]
            for value in values[1:]:  # Python's short-circuit value semantics
                result = (result and value) if isinstance(node.op, ast.And) else (result or value)
            return result
        raise ValueError(f"Unsupported expression element {ast.dump(node)} in {text!r}.")

    return walk(ast.parse(text.strip(), mode="eval"))


def web_of_lies_answer(question):
    """True if the last person in a web-of-lies question tells the truth."""
    sentences = [s.strip() for s in question.split(".") if s.strip()]
    statements, truthful = sentences[:-1], None
    for sentence in statements:
        claims_truth = sentence.endswith("tells the truth")
        if not claims_truth and not sentence.endswith("lies"):
            raise ValueError(f"Unexpected web_of_lies sentence {sentence!r} in {question!r}.")
        # The first sentence states a fact; each later one is said by the next person about the previous.
        truthful = claims_truth if truthful is None else (truthful == claims_truth)
    if truthful is None:
        raise ValueError(f"No statements in web_of_lies question {question!r}.")
    return truthful


def _bbh_row(bbh_task, prompt):
    if bbh_task == "boolean_expressions":  # "<expression> is "
        expression = prompt.strip()[: -len(" is")]
        return {"input": f"{expression} is", "target": str(evaluate_expression(expression))}
    if bbh_task == "web_of_lies":  # "Question: <question>\nAnswer: "
        question = prompt.split("\n")[0]
        text = question[len("Question: ") :]
        return {"input": question, "target": "Yes" if web_of_lies_answer(text) else "No"}
    expression = prompt.strip()[: -len("=")].strip()  # "<expression> = "
    return {"input": f"{expression} =", "target": str(evaluate_expression(expression))}


@contextlib.contextmanager
def _importable_package(root):
    """Makes `import bigbench.api.task` work when the package was found through the override."""
    parent = os.path.dirname(os.path.dirname(root))
    added = importlib.util.find_spec("bigbench") is None
    if added:
        sys.path.insert(0, parent)
    try:
        yield
    finally:
        if added and parent in sys.path:
            sys.path.remove(parent)


def generate_bbh_rows(bbh_task):
    """[{input, target}] generated by BIG-bench's task.py of a BBH-only task (deterministic, seed 42)."""
    if bbh_task not in PROGRAMMATIC_BBH:
        raise ValueError(
            f"{bbh_task!r} is not a programmatic BBH task the package can generate; these are {sorted(PROGRAMMATIC_BBH)}."
        )
    folder, kwargs = PROGRAMMATIC_BBH[bbh_task]
    path = os.path.join(task_dir(folder), "task.py")
    root = require_tasks_root()
    saved_state = random.getstate()  # the tasks reseed Python's global generator
    try:
        with _importable_package(root):
            spec = importlib.util.spec_from_file_location(f"_colm_bigbench_{folder}", path)
            module = importlib.util.module_from_spec(spec)
            try:
                spec.loader.exec_module(module)
            except ImportError as error:
                raise ImportError(f"Could not load BIG-bench's {path}: {error}. {INSTALL_HINT}") from error
            task_classes = [
                v for v in vars(module).values()
                if isinstance(v, type) and v.__module__ == module.__name__ and hasattr(v, "evaluate_model")
            ]
            if len(task_classes) != 1:
                raise ValueError(f"Expected one task class in {path}, found {[c.__name__ for c in task_classes]}.")
            recorder = _RecordingModel()
            task_classes[0](seed=42, **kwargs).evaluate_model(recorder)
    finally:
        random.setstate(saved_state)
    return [_bbh_row(bbh_task, prompt) for prompt in recorder.prompts]
