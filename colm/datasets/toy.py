"""The toy world: a miniature multitask collection that the embedded T5 was pre-trained on (text) and that
the quickstart recycles experts over (tasks).

Text. Sixteen domains (restaurants, news, medicine, law, animals, ...), each with its own words. A
pre-training sequence (`pretraining_text`) is two or three sentences from one domain about a few of its nouns,
written by a small grammar, so that a model trained on it learns, as a real language model does, to carry
its sequence's domain in every token's hidden state and to find a word again earlier in its input. `scripts/make_tiny_t5.py` pre-trains the embedded T5 on it.

Tasks. As real datasets do, tasks differ in domain, instruction and output format. Eight held-in tasks,
one domain each, half classification (rank classification over answer choices) and half generation:
  sentiment  restaurants   "review : ..."                         -> positive / negative
  topic      news          "headline : ..."                       -> sports / politics / science / business
  diagnosis  medicine      "symptoms : ..."                       -> infection / injury
  ruling     law           "ruling : ..."                         -> granted / denied
  qa         animals       "context : ... question : where ..."   -> the animal's habitat (a word)
  summary    mechanics     "summarize : ..."                      -> "<worker> <verb> <machine>"
  reverse    groceries     "reverse the list : a , b , c"         -> "c , b , a"
  instrument music         "which instrument ? ..."               -> the instrument (a word)
Held-out tasks recombine seen domains, skills and phrasings in unseen ways: sentiment of film reviews
(a skill on a domain no expert saw), paraphrased qa and topic instructions, rulings on medical
sentences (one expert's skill on another's domain), and counting grocery items (a skill no expert has, where
routing cannot help). See HELD_OUT_TASKS.

Examples are a pure function of (seed, task, split, num_examples); train and validation never share an
input (each input belongs to one split by a hash of its text).
"""

import os
import zlib

import gin
import numpy as np

from colm.datasets.dataset import Dataset
from colm.datasets.settings import register_setting

TOY_GIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy.gin")  # the toy world's registry
SPLITS = ("train", "validation")
_VALIDATION_MODULUS = 5  # 1 in 5 possible inputs is reserved for validation

POSITIVE = ["tasty", "friendly", "fresh", "lovely", "great", "superb"]
NEGATIVE = ["cold", "rude", "stale", "awful", "bland", "dirty"]
FUNCTION_WORDS = ["the", "a", "and", "in", "on", "at", "with", "of", "to", "was", "is", "then", "after", "before"]

# Each domain: nouns, verbs (past tense), adjectives, places. Used by the generic grammar; some tasks use
# their own templates on top (see the task functions).
DOMAINS = {
    "restaurants": dict(nouns=["soup", "waiter", "chef", "dessert", "menu", "salad", "steak", "table"],
                        verbs=["served", "cooked", "ordered", "tasted", "brought", "cleared"],
                        adjectives=["spicy", "warm", "crisp", "sweet", "salty", "smoky"],
                        places=["kitchen", "bistro", "terrace", "diner"]),
    "news": dict(nouns=["team", "coach", "minister", "parliament", "scientist", "experiment", "company", "market"],
                 verbs=["announced", "reported", "won", "approved", "discovered", "raised"],
                 adjectives=["national", "local", "annual", "major", "early", "final"],
                 places=["capital", "stadium", "laboratory", "exchange"]),
    "medicine": dict(nouns=["nurse", "doctor", "surgeon", "patient", "aspirin", "insulin", "penicillin", "vaccine"],
                     verbs=["gave", "prescribed", "injected", "examined", "treated", "monitored"],
                     adjectives=["sick", "calm", "feverish", "sterile", "daily", "careful"],
                     places=["clinic", "ward", "pharmacy", "hospital"]),
    "law": dict(nouns=["judge", "lawyer", "jury", "witness", "contract", "verdict", "appeal", "defendant"],
                verbs=["signed", "reviewed", "rejected", "approved", "questioned", "dismissed"],
                adjectives=["legal", "binding", "formal", "guilty", "senior", "sworn"],
                places=["court", "chamber", "office", "tribunal"]),
    "animals": dict(nouns=["fox", "owl", "bear", "frog", "deer", "eagle", "otter", "wolf"],
                    verbs=["hunted", "chased", "watched", "followed", "found", "heard"],
                    adjectives=["wild", "quiet", "furry", "hungry", "swift", "shy"],
                    places=["forest", "barn", "river", "cave", "meadow", "pond", "mountain", "swamp"]),
    "mechanics": dict(nouns=["mechanic", "engineer", "welder", "technician", "engine", "pump", "gearbox", "boiler"],
                      verbs=["repaired", "tested", "cleaned", "replaced", "assembled", "inspected"],
                      adjectives=["rusty", "broken", "heavy", "noisy", "greasy", "spare"],
                      places=["garage", "workshop", "factory", "hangar"]),
    "groceries": dict(nouns=["milk", "eggs", "bread", "rice", "butter", "cheese", "apples", "flour", "sugar",
                             "onions", "beans", "pasta"],
                      verbs=["bought", "packed", "weighed", "stocked", "sold", "counted"],
                      adjectives=["organic", "cheap", "ripe", "frozen", "fresh", "bulk"],
                      places=["market", "store", "shelf", "basket"]),
    "music": dict(nouns=["guitar", "piano", "violin", "drums", "flute", "trumpet", "cello", "harp"],
                  verbs=["played", "tuned", "practised", "performed", "recorded", "composed"],
                  adjectives=["loud", "soft", "slow", "lively", "gentle", "famous"],
                  places=["concert", "studio", "festival", "hall"]),
    "cinema": dict(nouns=["film", "actor", "plot", "scene", "director", "soundtrack", "sequel", "camera"],
                   verbs=["filmed", "directed", "edited", "premiered", "starred", "released"],
                   adjectives=["dramatic", "funny", "long", "silent", "classic", "dark"],
                   places=["theatre", "set", "screen", "premiere"]),
    "travel": dict(nouns=["train", "ticket", "passport", "tourist", "luggage", "flight", "hotel", "map"],
                   verbs=["booked", "missed", "boarded", "checked", "cancelled", "delayed"],
                   adjectives=["early", "late", "crowded", "direct", "foreign", "scenic"],
                   places=["station", "airport", "harbour", "border"]),
    "weather": dict(nouns=["storm", "rain", "wind", "snow", "cloud", "fog", "thunder", "sun"],
                    verbs=["soaked", "covered", "flooded", "cleared", "battered", "warmed"],
                    adjectives=["cold", "humid", "stormy", "windy", "mild", "frosty"],
                    places=["coast", "valley", "city", "hills"]),
    "school": dict(nouns=["teacher", "student", "lesson", "exam", "homework", "class", "pencil", "library"],
                   verbs=["graded", "taught", "studied", "wrote", "passed", "explained"],
                   adjectives=["hard", "easy", "clever", "bored", "tidy", "new"],
                   places=["classroom", "campus", "hallway", "playground"]),
    "ocean": dict(nouns=["whale", "shark", "coral", "sailor", "wave", "reef", "dolphin", "boat"],
                  verbs=["sailed", "dived", "spotted", "drifted", "swam", "anchored"],
                  adjectives=["deep", "blue", "salty", "calm", "tropical", "rough"],
                  places=["sea", "bay", "lagoon", "shore"]),
    "space": dict(nouns=["rocket", "astronaut", "planet", "comet", "orbit", "satellite", "moon", "telescope"],
                  verbs=["launched", "orbited", "observed", "landed", "measured", "tracked"],
                  adjectives=["distant", "bright", "lunar", "solar", "icy", "massive"],
                  places=["galaxy", "station", "crater", "cosmos"]),
    "farming": dict(nouns=["farmer", "tractor", "wheat", "cow", "sheep", "harvest", "seed", "fence"],
                    verbs=["planted", "harvested", "milked", "ploughed", "fed", "watered"],
                    adjectives=["green", "dry", "muddy", "golden", "tall", "young"],
                    places=["field", "farm", "orchard", "stable"]),
    "computers": dict(nouns=["server", "laptop", "keyboard", "program", "database", "network", "screen", "cable"],
                      verbs=["crashed", "compiled", "installed", "updated", "deleted", "rebooted"],
                      adjectives=["fast", "slow", "digital", "remote", "secure", "virtual"],
                      places=["datacenter", "cloud", "desk", "lab"]),
}

NEWS_SECTIONS = {
    "sports": dict(nouns=["team", "coach", "player", "goal", "match"], verbs=["won", "scored", "lost"]),
    "politics": dict(nouns=["minister", "parliament", "election", "senator", "party"],
                     verbs=["voted", "debated", "approved"]),
    "science": dict(nouns=["scientist", "experiment", "cell", "theory", "telescope"],
                    verbs=["discovered", "measured", "published"]),
    "business": dict(nouns=["company", "market", "profit", "bank", "investor"], verbs=["raised", "sold", "bought"]),
}
LABELS_DIAGNOSIS = ("infection", "injury")
SYMPTOMS = {"infection": ["fever", "cough", "chills", "rash", "sneezing", "headache"],
            "injury": ["fracture", "sprain", "bruise", "cut", "burn", "swelling"]}
WHEN = ["this morning", "at noon", "yesterday", "tonight"]
LABELS_RULING = ("granted", "denied")
RULING_VERBS = {"granted": ["approved", "accepted", "upheld", "confirmed"],
                "denied": ["rejected", "dismissed", "refused", "overruled"]}
WORKERS = ["mechanic", "engineer", "welder", "technician"]
MACHINES = ["engine", "pump", "gearbox", "boiler", "turbine", "motor"]
MUSICIANS = ["band", "singer", "student", "orchestra", "busker", "teacher"]
COUNT_WORDS = ["one", "two", "three", "four", "five"]


def _pick(rng, items):
    return items[int(rng.integers(len(items)))]


def domain_sentence(rng, domain, cast=None):
    """One sentence of a domain from the generic grammar. `cast`: the nouns the sequence is about; most noun
    slots reuse one of them, as real text keeps returning to its subjects."""
    d = DOMAINS[domain]

    def noun():
        return _pick(rng, cast) if cast and rng.random() < 0.7 else _pick(rng, d["nouns"])

    kind = int(rng.integers(5))
    if kind == 0:
        return f"the {_pick(rng, d['adjectives'])} {noun()} {_pick(rng, d['verbs'])} the {noun()} in the {_pick(rng, d['places'])} ."
    if kind == 1:
        return f"the {noun()} {_pick(rng, d['verbs'])} a {_pick(rng, d['adjectives'])} {noun()} ."
    if kind == 2:
        polar = POSITIVE if rng.random() < 0.5 else NEGATIVE
        return f"the {noun()} at the {_pick(rng, d['places'])} was {_pick(rng, polar)} ."
    if kind == 3:
        items = [noun() for _ in range(int(rng.integers(2, 5)))]
        return f"the {_pick(rng, d['places'])} had {' , '.join(items[:-1])} and {items[-1]} ."
    return f"after the {noun()} {_pick(rng, d['verbs'])} the {noun()} , the {noun()} was {_pick(rng, d['adjectives'])} ."


def pretraining_text(rng):
    """One pre-training sequence: two or three sentences of one domain about a cast of two or three of its
    nouns (so that predicting a token often means finding it earlier in the sequence)."""
    domain = _pick(rng, list(DOMAINS))
    cast = list(rng.choice(DOMAINS[domain]["nouns"], size=int(rng.integers(2, 4)), replace=False))
    return " ".join(domain_sentence(rng, domain, cast) for _ in range(int(rng.integers(2, 4))))


# ---- tasks: each returns (input, target, answer choices or None) ---------------------------------------
def _sentiment(rng, domain="restaurants", instruction="review :"):
    d = DOMAINS[domain]
    label = int(rng.integers(2))
    polar = NEGATIVE if label == 0 else POSITIVE
    a, b = rng.choice(d["nouns"], size=2, replace=False)
    text = f"the {a} was {_pick(rng, polar)} and the {b} was {_pick(rng, polar)} ."
    return f"{instruction} {text}", ["negative", "positive"][label], ["negative", "positive"]


def _topic(rng, instruction="headline :"):
    section = _pick(rng, list(NEWS_SECTIONS))
    s = NEWS_SECTIONS[section]
    a, b = rng.choice(s["nouns"], size=2, replace=False)
    adjective = _pick(rng, DOMAINS["news"]["adjectives"])
    text = f"the {adjective} {a} {_pick(rng, s['verbs'])} the {b} ."
    return f"{instruction} {text}", section, list(NEWS_SECTIONS)


def _diagnosis(rng, instruction="symptoms :"):
    label = int(rng.integers(2))
    symptoms = rng.choice(SYMPTOMS[LABELS_DIAGNOSIS[label]], size=2, replace=False)
    text = (f"the {_pick(rng, ['sick', 'calm', 'feverish', 'young', 'old'])} patient had {symptoms[0]} and "
            f"{symptoms[1]} in the {_pick(rng, DOMAINS['medicine']['places'])} {_pick(rng, WHEN)} .")
    return f"{instruction} {text}", LABELS_DIAGNOSIS[label], list(LABELS_DIAGNOSIS)


def _ruling(rng, domain="law", instruction="ruling :"):
    """Granted or denied, by the verb of the decision."""
    d = DOMAINS[domain]
    label = int(rng.integers(2))
    verb = _pick(rng, RULING_VERBS[LABELS_RULING[label]])
    a, b = rng.choice(d["nouns"], size=2, replace=False)
    text = (f"the {_pick(rng, d['adjectives'])} {a} {verb} the {b} in the {_pick(rng, d['places'])} "
            f"{_pick(rng, WHEN)} .")
    return f"{instruction} {text}", LABELS_RULING[label], list(LABELS_RULING)


def _qa(rng, paraphrase=False):
    d = DOMAINS["animals"]
    k = int(rng.integers(2, 4))
    animals = rng.choice(d["nouns"], size=k, replace=False)
    homes = rng.choice(d["places"], size=k, replace=False)
    facts = " ".join(f"the {a} lives in the {h} ." for a, h in zip(animals, homes))
    asked = int(rng.integers(k))
    if paraphrase:
        return f"passage : {facts} query : what is the home of the {animals[asked]} ?", str(homes[asked]), None
    return f"context : {facts} question : where does the {animals[asked]} live ?", str(homes[asked]), None


def _summary(rng):
    d = DOMAINS["mechanics"]
    worker, verb, machine = _pick(rng, WORKERS), _pick(rng, d["verbs"]), _pick(rng, MACHINES)
    a1, a2 = rng.choice(d["adjectives"], size=2, replace=False)
    text = f"the {a1} {worker} {verb} the {a2} {machine} in the {_pick(rng, d['places'])} ."
    return f"summarize : {text}", f"{worker} {verb} {machine}", None


def _reverse(rng):
    items = list(rng.choice(DOMAINS["groceries"]["nouns"], size=int(rng.integers(3, 6)), replace=False))
    return f"reverse the list : {' , '.join(items)}", " , ".join(items[::-1]), None


def _instrument(rng):
    d = DOMAINS["music"]
    instrument = _pick(rng, d["nouns"])
    text = (f"the {_pick(rng, d['adjectives'])} {_pick(rng, MUSICIANS)} {_pick(rng, ['played', 'practised', 'tuned'])} "
            f"the {instrument} at the {_pick(rng, d['places'])} .")
    return f"which instrument ? {text}", instrument, None


def _count(rng):
    k = int(rng.integers(1, 6))
    items = list(rng.choice(DOMAINS["groceries"]["nouns"], size=k, replace=False))
    return f"how many items ? {' , '.join(items)}", COUNT_WORDS[k - 1], list(COUNT_WORDS)


TASKS = {
    # held-in: one expert each
    "sentiment": _sentiment,
    "topic": _topic,
    "diagnosis": _diagnosis,
    "ruling": _ruling,
    "qa": _qa,
    "summary": _summary,
    "reverse": _reverse,
    "instrument": _instrument,
    # held-out: no expert trained on them
    "film_sentiment": lambda rng: _sentiment(rng, domain="cinema"),
    "qa_paraphrase": lambda rng: _qa(rng, paraphrase=True),
    "topic_paraphrase": lambda rng: _topic(rng, instruction="which section of the paper ?"),
    "medical_ruling": lambda rng: _ruling(rng, domain="medicine"),
    "count": _count,
}
HELD_IN_TASKS = ("sentiment", "topic", "diagnosis", "ruling", "qa", "summary", "reverse", "instrument")
HELD_OUT_TASKS = ("film_sentiment", "qa_paraphrase", "topic_paraphrase", "medical_ruling", "count")


def task_format(task):
    """(metric, chance score) of a task: accuracy over its answer choices, or exact match of generated text."""
    choices = TASKS[task](np.random.default_rng(0))[2]
    return ("accuracy", 1.0 / len(choices)) if choices else ("exact_match", 0.0)


def task_of_scope(scope):
    """The toy task behind a scope stem ("TOYFILMSENTIMENT" -> "film_sentiment"), or None."""
    return next((task for task in TASKS if scope_name(task) == scope), None)


def scope_name(task):
    """Gin scope stem of a task: "film_sentiment" -> "TOYFILMSENTIMENT"."""
    return "TOY" + task.replace("_", "").upper()


def expert_name(task):
    """Expert name of a held-in task: "sentiment" -> "ToySentiment"."""
    return "Toy" + task.title().replace("_", "")


# The toy world's expert setting "Toy": one expert per held-in task, in this order (an expert's index).
TOY_NAMES = tuple(expert_name(task) for task in HELD_IN_TASKS)
register_setting("Toy", {expert_name(task): scope_name(task) for task in HELD_IN_TASKS})


def input_split(text):
    """The split an input belongs to (a stable hash, so splits never overlap)."""
    return "validation" if zlib.crc32(text.encode()) % _VALIDATION_MODULUS == 0 else "train"


def generate_examples(task, split, num_examples, seed=42):
    """Deterministic list of distinct examples of `task` for `split`."""
    if task not in TASKS:
        raise ValueError(f"Unknown toy task {task!r}; known: {sorted(TASKS)}.")
    if split not in SPLITS:
        raise ValueError(f"Toy split {split!r} is not supported; use one of {list(SPLITS)}.")
    rng = np.random.default_rng([seed, zlib.crc32(task.encode()), SPLITS.index(split)])
    seen, examples = set(), []
    for _ in range(200 * num_examples + 1000):
        if len(examples) == num_examples:
            break
        input_str, target, choices = TASKS[task](rng)
        if input_str in seen or input_split(input_str) != split:
            continue
        seen.add(input_str)
        example = {"input_str": input_str, "target_str": target, "answer_choices": list(choices or []), "task": task}
        if choices is not None:
            example["label"] = choices.index(target)
        examples.append(example)
    else:
        raise ValueError(f"Toy task {task!r} ({split}) has fewer than {num_examples} distinct inputs; "
                         "lower num_examples.")
    return examples


@gin.configurable
class ToyDataset(Dataset):
    """A task of the toy world (see the module docstring).

    task: a name of TASKS. num_examples: examples generated for this split.
    metrics: defaults to ["accuracy"] for classification, ["exact_match"] otherwise.
    """

    def __init__(self, name, split, batch_size, task, num_examples=1000, dataset_path=None, seed=42,
                 max_examples_per_dataset=None, metrics=None, max_length=None):
        self.task = task
        self.num_examples = num_examples
        if task not in TASKS:
            raise ValueError(f"ToyDataset.task={task!r} is not a toy task; known: {sorted(TASKS)}.")
        if metrics is None:
            metrics = [task_format(task)[0]]
        super().__init__(name=name, split=split, batch_size=batch_size, dataset_path=dataset_path, seed=seed,
                         max_examples_per_dataset=max_examples_per_dataset, metrics=metrics, max_length=max_length)

    def load_data(self):
        self.examples = generate_examples(self.task, self.split, self.num_examples, seed=self.seed)
