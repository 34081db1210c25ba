"""The toy world: synthetic string tasks for training tiny models on CPU.

Each example is f"{instruction} {payload}" where the payload is a random string
of lowercase letters and the target is a skill applied to the payload. Examples
are a pure function of (seed, task, split, sizes), so runs are reproducible.

A task is a skill name ("reverse") or a composition applied left to right
("reverse+shift" = shift(reverse(payload))); a classification skill may only
come last, and then the task is multiple choice over that skill's answers.

Train and validation are disjoint: every payload is assigned to exactly one
split by a hash of its letters, and each split only keeps its own payloads.
"""

import zlib

import gin
import numpy as np

from colm.datasets.dataset import Dataset

VOWELS = frozenset("aeiou")
SPLITS = ("train", "validation")
# Fraction of the payload space reserved for validation is 1 / _VALIDATION_MODULUS.
_VALIDATION_MODULUS = 5


def reverse(s):
    return s[::-1]


def sort_letters(s):
    return "".join(sorted(s))


def first_letter(s):
    return s[:1]


def last_letter(s):
    return s[-1:]


def double(s):
    return "".join(c + c for c in s)


def shift(s):
    return "".join(chr((ord(c) - ord("a") + 1) % 26 + ord("a")) for c in s)


def dedup(s):
    return "".join(c for i, c in enumerate(s) if c not in s[:i])


def swap_halves(s):
    # For odd lengths the middle letter goes with the second half: abcde -> cdeab.
    half = len(s) // 2
    return s[half:] + s[:half]


def first_is_vowel(s):
    return "yes" if s[:1] in VOWELS else "no"


def length_parity(s):
    return "even" if len(s) % 2 == 0 else "odd"


def contains_a(s):
    return "yes" if "a" in s else "no"


# The skill table: name -> (function, default instruction, answer choices or None).
# Skills with answer choices are classification (multiple choice) skills.
SKILLS = {
    "reverse": (reverse, "reverse", None),
    "sort": (sort_letters, "sort", None),
    "first_letter": (first_letter, "first", None),
    "last_letter": (last_letter, "last", None),
    "double": (double, "double", None),
    "shift": (shift, "shift", None),
    "dedup": (dedup, "dedup", None),
    "swap_halves": (swap_halves, "swap", None),
    "first_is_vowel": (first_is_vowel, "vowel start?", ("no", "yes")),
    "length_parity": (length_parity, "parity", ("even", "odd")),
    "contains_a": (contains_a, "has a?", ("no", "yes")),
    # Same function as first_letter, but as a 5-way choice (payloads start with a-e).
    "first_letter_class": (first_letter, "initial", ("a", "b", "c", "d", "e")),
}


def parse_task(task):
    """Returns (function, default instruction, answer choices or None) of a task."""
    names = task.split("+")
    unknown = [n for n in names if n not in SKILLS]
    if unknown or not task:
        raise ValueError(f"Unknown toy skill(s) {unknown or [task]} in task {task!r}; known: {sorted(SKILLS)}.")
    for n in names[:-1]:
        if SKILLS[n][2] is not None:
            raise ValueError(f"Task {task!r}: classification skill {n!r} may only come last.")
    fns = [SKILLS[n][0] for n in names]

    def composed(payload):
        for fn in fns:
            payload = fn(payload)
        return payload

    instruction = " then ".join(SKILLS[n][1] for n in names)
    return composed, instruction, SKILLS[names[-1]][2]


def scope_name(task):
    """Gin scope stem of a task: "first_is_vowel" -> "TOYFIRSTISVOWEL"."""
    return "TOY" + task.replace("_", "").replace("+", "").upper()


def payload_split(payload):
    """The split a payload belongs to (a stable hash, so splits never overlap)."""
    return "validation" if zlib.crc32(payload.encode()) % _VALIDATION_MODULUS == 0 else "train"


def generate_examples(task, split, num_examples, seed=42, min_len=4, max_len=8, instruction=None):
    """Deterministic list of distinct examples of `task` for `split`.

    Classification tasks are class-balanced: each example first draws its answer
    uniformly, then draws payloads until one has that answer.
    """
    if split not in SPLITS:
        raise ValueError(f"Toy split {split!r} is not supported; use one of {list(SPLITS)}.")
    if not 1 <= min_len <= max_len:
        raise ValueError(f"Toy payload lengths need 1 <= min_len <= max_len; got {min_len}, {max_len}.")
    fn, default_instruction, choices = parse_task(task)
    instruction = default_instruction if instruction is None else instruction
    rng = np.random.default_rng([seed, zlib.crc32(task.encode()), SPLITS.index(split)])
    max_draws = 1000 * num_examples + 10000
    draws = 0
    seen = set()
    examples = []
    while len(examples) < num_examples:
        wanted = None if choices is None else choices[int(rng.integers(len(choices)))]
        while True:
            draws += 1
            if draws > max_draws:
                raise ValueError(
                    f"Toy task {task!r} ({split}): could not find {num_examples} distinct payloads "
                    f"of length {min_len}-{max_len}; lower num_examples or raise max_len."
                )
            length = int(rng.integers(min_len, max_len + 1))
            payload = "".join(chr(ord("a") + int(c)) for c in rng.integers(0, 26, size=length))
            if payload in seen or payload_split(payload) != split:
                continue
            target = fn(payload)
            if wanted is None or target == wanted:
                break
        seen.add(payload)
        example = {
            "input_str": f"{instruction} {payload}",
            "target_str": target,
            "answer_choices": list(choices or []),
            "payload": payload,
            "task": task,
        }
        if choices is not None:
            example["label"] = choices.index(target)
        examples.append(example)
    return examples


@gin.configurable
class ToyDataset(Dataset):
    """A synthetic toy task (see the module docstring).

    task: skill name or "a+b" composition (see SKILLS).
    num_examples: number of examples generated for this split.
    instruction: replaces the task's default instruction (held-out phrasings).
    min_len / max_len: payload length range, in letters (= bytes for ByT5).
    metrics: defaults to ["accuracy"] for classification, ["exact_match"] otherwise.
    """

    def __init__(
        self,
        name,
        split,
        batch_size,
        task,
        num_examples=1000,
        instruction=None,
        min_len=4,
        max_len=8,
        dataset_path=None,
        seed=42,
        max_examples_per_dataset=None,
        metrics=None,
        max_length=None,
    ):
        self.task = task
        self.num_examples = num_examples
        self.instruction = instruction
        self.min_len = min_len
        self.max_len = max_len
        if metrics is None:
            metrics = ["exact_match"] if parse_task(task)[2] is None else ["accuracy"]
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

    def load_data(self):
        self.examples = generate_examples(
            self.task,
            self.split,
            self.num_examples,
            seed=self.seed,
            min_len=self.min_len,
            max_len=self.max_len,
            instruction=self.instruction,
        )
