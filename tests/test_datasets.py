"""Tests of colm.datasets: tokenization, the base Dataset, LocalDataset and the toy world."""

import collections
import json
import re

import datasets as hf_datasets
import gin
import numpy as np
import pytest
import torch
from transformers import ByT5Tokenizer

from colm.datasets import toy
from colm.datasets.dataset import Dataset, InterfaceInfo, special_ids, tokenize
from colm.datasets.local import LocalDataset, resolve_local_source
from colm.datasets.toy import TOY_GIN, ToyDataset


@pytest.fixture
def tok():
    return ByT5Tokenizer()


@pytest.fixture(scope="module")
def tiny_tok():
    """The embedded T5's own tokenizer (colm/models/tiny/toy_t5)."""
    from colm.models.hf_loading import hf_tokenizer

    return hf_tokenizer("colm/models/tiny/toy_t5")


@pytest.fixture(autouse=True)
def clear_gin_config():
    gin.clear_config()
    yield
    gin.clear_config()


def ids(text):
    """ByT5 ids of a text without special tokens (byte + 3)."""
    return [b + 3 for b in text.encode()]


class FakeBosTokenizer:
    """Adds bos 5 and eos 6; tokens are code points."""

    pad_token_id = 0

    def __call__(self, text, add_special_tokens=True):
        tokens = [ord(c) for c in text]
        return {"input_ids": [5] + tokens + [6] if add_special_tokens else tokens}


class ListDataset(Dataset):
    def __init__(self, examples, **kwargs):
        self.given = examples
        kwargs.setdefault("batch_size", 2)
        super().__init__(name="list", split="train", **kwargs)

    def load_data(self):
        self.examples = list(self.given)


def ex(input_str, target_str, choices=(), **extra):
    return {"input_str": input_str, "target_str": target_str, "answer_choices": list(choices), **extra}


# ---- special ids and tokenize ---------------------------------------------------


def test_special_ids_probe_and_override(tok):
    assert special_ids(tok) == (None, 1)
    assert special_ids(FakeBosTokenizer()) == (5, 6)
    fake = FakeBosTokenizer()
    fake.colm_bos_id, fake.colm_eos_id = None, 9  # set by hand: not re-probed
    assert special_ids(fake) == (None, 9)


def test_tokenize_fits_untouched(tok):
    assert tokenize(tok, "abc") == ids("abc") + [1]
    assert tokenize(tok, ["ab", "cd"], max_length=5) == ids("abcd") + [1]


def test_tokenize_single_long_text_keeps_prefix_then_eos(tok):
    assert tokenize(tok, "abcdefghij", max_length=5) == ids("abcd") + [1]


def test_tokenize_short_segment_kept_whole(tok):
    # budget 7: "ab" whole, the long one cut to 5
    assert tokenize(tok, ["ab", "cdefghijkl"], max_length=8) == ids("ab") + ids("cdefg") + [1]
    assert tokenize(tok, ["cdefghijkl", "ab"], max_length=8) == ids("cdefg") + ids("ab") + [1]


def test_tokenize_equal_long_segments_leftover_to_earliest(tok):
    # budget 5 over two long segments: cap 2, leftover 1 to the first
    assert tokenize(tok, ["abcdef", "ghijkl"], max_length=6) == ids("abc") + ids("gh") + [1]
    # budget 9: "xy" whole, 7 over two long ones -> 4 and 3
    got = tokenize(tok, ["abcdefgh", "xy", "mnopqrst"], max_length=10)
    assert got == ids("abcd") + ids("xy") + ids("mno") + [1]


def test_tokenize_with_bos():
    fake = FakeBosTokenizer()
    assert tokenize(fake, "abcdef", max_length=5) == [5] + [ord(c) for c in "abc"] + [6]


def test_tokenize_too_small_max_length(tok):
    with pytest.raises(ValueError, match="max_length"):
        tokenize(tok, "abc", max_length=0)


# ---- InterfaceInfo ----------------------------------------------------------------


def test_interface_info_defaults_and_errors():
    info = InterfaceInfo()
    assert (info.interface, info.num_beams, info.max_gen_length, info.length_normalization) == ("lm", 1, 20, True)
    assert (info.multiple_choice_loss, info.unlikelihood_loss, info.input_loss) == (0, 0, 0)
    with pytest.raises(ValueError, match="'classify'"):
        InterfaceInfo(interface="classify")
    with pytest.warns(UserWarning, match="num_beam"):
        InterfaceInfo(num_beam=4)


def test_interface_info_gin_scope():
    gin.parse_config('D/X/EVAL/InterfaceInfo.interface = "mc"\nD/X/EVAL/InterfaceInfo.num_beams = 3')
    with gin.config_scope("D/X/EVAL"):
        info = InterfaceInfo()
    assert (info.interface, info.num_beams) == ("mc", 3)
    assert InterfaceInfo().interface == "lm"


# ---- Dataset: items, labels, collate, truncation ---------------------------------------


def test_getitem_fields(tok):
    d = ListDataset([ex("in", "out")], max_length=16)
    with pytest.raises(RuntimeError, match="set_tokenizer"):
        d[0]
    d.set_tokenizer(tok)
    item = d[0]
    assert item["input_ids"] == ids("in") + [1]
    assert item["target_ids"] == ids("out") + [1]
    assert item["label"] == -1 and item["answer_choices_ids"] == []
    assert item["references"] == ["out"] and item["multi_label"] is None
    assert item["idx"] == 0 and item["dataset_name"] == "list"


def test_label_rule(tok):
    d = ListDataset(
        [
            ex("q", "yes", ["no", "yes"], label=0),  # given label wins
            ex("q", "yes", ["no", "yes"]),  # target is a choice
            ex("q", "yesss", ["maybe", "yellow", "yes"]),  # longest common prefix
            ex("q", "zzz", ["no", "yes"]),  # no overlap: first choice
            ex("q", "free text"),  # no choices
        ]
    )
    d.set_tokenizer(tok)
    assert [d[i]["label"] for i in range(5)] == [0, 1, 2, 0, -1]
    assert d[1]["answer_choices_ids"] == [ids("no") + [1], ids("yes") + [1]]


def test_missing_example_keys(tok):
    d = ListDataset([{"input_str": "q"}])
    d.set_tokenizer(tok)
    with pytest.raises(KeyError, match="target_str"):
        d[0]


def test_label_out_of_range(tok):
    d = ListDataset([ex("q", "yes", ["no", "yes"], label=2)])
    d.set_tokenizer(tok)
    with pytest.raises(ValueError, match="label 2"):
        d[0]


def test_collate_pads_inputs_and_choices(tok):
    d = ListDataset(
        [
            ex("a", "yes", ["no", "yes"]),
            ex("abcd", "bb", ["a", "bb", "ccc"]),
            ex("ab", "free"),
        ]
    )
    d.set_tokenizer(tok)
    batch = d.collate([d[0], d[1], d[2]])
    assert batch["input_ids"].dtype == torch.int64 and batch["input_ids"].shape == (3, 5)
    assert batch["input_ids"][0].tolist() == ids("a") + [1, 0, 0, 0]
    assert batch["target_ids"].shape == (3, 5)
    assert batch["answer_choices_ids"].shape == (3, 3, 4)
    assert batch["answer_choices_ids"][0, 1].tolist() == ids("yes") + [1]
    assert batch["answer_choices_ids"][0, 2].tolist() == [0, 0, 0, 0]  # filler [pad] choice
    assert batch["answer_choices_ids"][2].eq(0).all()
    assert batch["label"].tolist() == [1, 1, -1]
    assert batch["input_str"] == ["a", "abcd", "ab"] and batch["idx"] == [0, 1, 2]
    assert batch["dataset_name"] == ["list"] * 3
    no_choices = d.collate([d[2], d[2]])
    assert "answer_choices_ids" not in no_choices


def test_max_length_applies_to_items(tok):
    d = ListDataset([ex("abcdefghij", "klmnopqrst", ["abcdefghij"])], max_length=4)
    d.set_tokenizer(tok)
    item = d[0]
    assert item["input_ids"] == ids("abc") + [1]
    assert item["target_ids"] == ids("klm") + [1]
    assert item["answer_choices_ids"] == [ids("abc") + [1]]


def test_truncate_dataset_random_sorted_subset():
    examples = [ex(str(i), str(i)) for i in range(20)]
    d = ListDataset(examples, max_examples_per_dataset=5, seed=1)
    kept = [int(e["input_str"]) for e in d.examples]
    assert len(d) == 5 and kept == sorted(kept) and kept != list(range(5))
    again = ListDataset(examples, max_examples_per_dataset=5, seed=1)
    assert [e["input_str"] for e in again.examples] == [e["input_str"] for e in d.examples]
    other = ListDataset(examples, max_examples_per_dataset=5, seed=2)
    assert [e["input_str"] for e in other.examples] != [e["input_str"] for e in d.examples]
    assert len(ListDataset(examples, max_examples_per_dataset=50)) == 20


def test_peek_stats(tok):
    d = ListDataset([ex("ab", "c"), ex("abcd", "cde")])
    d.set_tokenizer(tok)
    assert d.peek_stats() == {"input_tokens": 4.0, "target_tokens": 3.0}


# ---- LocalDataset -------------------------------------------------------------------

ROWS = [
    {"question": f"q{i}", "answer": "yes" if i % 2 else "no", "options": ["no", "yes"], "gold": i % 2} for i in range(6)
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def local(path, split="train", **kwargs):
    kwargs = {"input_field": "question", "target_field": "answer", **kwargs}
    return LocalDataset(name="loc", split=split, batch_size=2, path=str(path), **kwargs)


def test_local_jsonl_file(tmp_path, tok):
    write_jsonl(tmp_path / "data.jsonl", ROWS)
    d = local(tmp_path / "data.jsonl", answer_choices_field="options", label_field="gold")
    d.set_tokenizer(tok)
    assert len(d) == 6
    item = d[3]
    assert (item["input_str"], item["target_str"], item["answer_choices"], item["label"]) == (
        "q3",
        "yes",
        ["no", "yes"],
        1,
    )
    assert d.get_example(3)["gold"] == 1  # raw fields kept


def test_local_split_files_in_directory(tmp_path, tok, monkeypatch):
    write_jsonl(tmp_path / "train.jsonl", ROWS)
    hf_datasets.Dataset.from_list(ROWS[:2]).to_parquet(str(tmp_path / "validation.parquet"))
    monkeypatch.setenv("COLM_TEST_ROOT", str(tmp_path))
    train = local("$COLM_TEST_ROOT", split="train")
    valid = local("$COLM_TEST_ROOT", split="validation")
    assert (len(train), len(valid)) == (6, 2)
    valid.set_tokenizer(tok)
    assert valid[1]["target_str"] == "yes" and valid[1]["label"] == -1


def test_local_parquet_file_and_truncation(tmp_path):
    hf_datasets.Dataset.from_list(ROWS).to_parquet(str(tmp_path / "d.parquet"))
    d = local(tmp_path / "d.parquet", max_examples_per_dataset=3)
    kept = sorted(np.random.default_rng(42).choice(6, size=3, replace=False))
    assert len(d) == 3
    assert [d.get_example(i)["input_str"] for i in range(3)] == [f"q{i}" for i in kept]


def test_local_save_to_disk(tmp_path, tok):
    dd = hf_datasets.DatasetDict(
        {"train": hf_datasets.Dataset.from_list(ROWS), "test": hf_datasets.Dataset.from_list(ROWS[:1])}
    )
    dd.save_to_disk(str(tmp_path / "dict"))
    hf_datasets.Dataset.from_list(ROWS[:4]).save_to_disk(str(tmp_path / "single"))
    assert len(local(tmp_path / "dict", split="test")) == 1
    assert len(local(tmp_path / "single", split="anything")) == 4
    d = local(tmp_path / "dict", references_field="options")
    d.set_tokenizer(tok)
    assert d[0]["references"] == ["no", "yes"]
    with pytest.raises(KeyError, match=r"validation.*\['test', 'train'\]"):
        local(tmp_path / "dict", split="validation")


def test_local_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        local(tmp_path / "nowhere")
    write_jsonl(tmp_path / "train.jsonl", ROWS)
    with pytest.raises(FileNotFoundError, match=r"'validation'.*train\.jsonl"):
        local(tmp_path, split="validation")
    with pytest.raises(KeyError, match=r"'label'.*question"):
        local(tmp_path, label_field="label")
    with pytest.raises(KeyError, match="'input'"):
        LocalDataset(name="x", split="train", batch_size=1, path=str(tmp_path))
    with pytest.raises(ValueError, match="LocalDataset.path"):
        LocalDataset(name="x", split="train", batch_size=1)


def test_resolve_local_source(tmp_path, monkeypatch):
    (tmp_path / "super_glue" / "rte").mkdir(parents=True)
    monkeypatch.delenv("COLM_DATA_DIR", raising=False)
    assert resolve_local_source(["super_glue", "rte"]) is None
    monkeypatch.setenv("COLM_DATA_DIR", str(tmp_path))
    assert resolve_local_source(["super_glue", "rte"]) == str(tmp_path / "super_glue" / "rte")
    assert resolve_local_source(("super_glue",)) == str(tmp_path / "super_glue")
    assert resolve_local_source(["super_glue", "cb"]) is None


# ---- the toy world ------------------------------------------------------------------


def test_toy_tasks_on_their_own_rules():
    rng = np.random.default_rng(0)
    for _ in range(200):
        text, target, choices = toy.TASKS["reverse"](rng)
        assert target.split(" , ") == text.split(" : ")[1].split(" , ")[::-1]
        text, target, _ = toy.TASKS["qa"](rng)
        animal = text.split("where does the ")[1].split(" live")[0]
        assert f"the {animal} lives in the {target} ." in text
        text, target, _ = toy.TASKS["summary"](rng)
        worker, verb, machine = target.split()
        assert f"{worker} {verb} the" in text and text.rstrip(" .").split(" in the ")[0].endswith(machine)
        text, target, choices = toy.TASKS["diagnosis"](rng)
        assert all(w in toy.SYMPTOMS[target] for w in text.split() if w in sum(toy.SYMPTOMS.values(), []))
        text, target, choices = toy.TASKS["sentiment"](rng)
        polar = toy.POSITIVE if target == "positive" else toy.NEGATIVE
        assert all(w in polar for w in text.split() if w in toy.POSITIVE + toy.NEGATIVE)
        text, target, choices = toy.TASKS["count"](rng)
        assert choices.index(target) + 1 == len(text.split(" ? ")[1].split(" , "))
        text, target, choices = toy.TASKS["ruling"](rng)
        verbs = [w for w in text.split() if w in sum(toy.RULING_VERBS.values(), [])]
        assert len(verbs) == 1 and verbs[0] in toy.RULING_VERBS[target] and choices == list(toy.LABELS_RULING)
    # every held-in task has a domain of its own: no content word of one task's inputs is in another's
    vocab = {task: {w for e in toy.generate_examples(task, "train", 300) for w in e["input_str"].split()}
             for task in toy.HELD_IN_TASKS}
    shared = (set(toy.FUNCTION_WORDS) | set(toy.POSITIVE) | set(toy.NEGATIVE) | {":", "?", ".", ",", "the", "a"}
              | {w for phrase in toy.WHEN for w in phrase.split()})
    for a in toy.HELD_IN_TASKS:
        for b in toy.HELD_IN_TASKS:
            if a < b:
                assert len((vocab[a] & vocab[b]) - shared) <= 3, (a, b, (vocab[a] & vocab[b]) - shared)


def make_toy(task, split, **kwargs):
    return ToyDataset(name=f"toy_{task}", split=split, batch_size=4, task=task, **kwargs)


def test_toy_determinism_and_consistency():
    a = make_toy("reverse", "train", num_examples=300)
    b = make_toy("reverse", "train", num_examples=300)
    c = make_toy("reverse", "train", num_examples=300, seed=7)
    assert a.examples == b.examples and a.examples != c.examples
    assert len({e["input_str"] for e in a.examples}) == 300
    assert a.metrics == ["exact_match"] and make_toy("topic", "train", num_examples=5).metrics == ["accuracy"]


def test_toy_train_validation_disjoint():
    for task in toy.TASKS:
        train = make_toy(task, "train", num_examples=1000)
        valid = make_toy(task, "validation", num_examples=200)
        train_inputs = {e["input_str"] for e in train.examples}
        valid_inputs = {e["input_str"] for e in valid.examples}
        assert len(valid_inputs) == 200 and not train_inputs & valid_inputs, task


def test_toy_classification_labels(tok):
    d = make_toy("topic", "train", num_examples=500)
    counts = collections.Counter(e["target_str"] for e in d.examples)
    assert set(counts) == set(toy.NEWS_SECTIONS) and min(counts.values()) > 80
    d.set_tokenizer(tok)
    item = d[0]
    assert item["answer_choices"][item["label"]] == item["target_str"]
    diagnosis = make_toy("diagnosis", "train", num_examples=400)
    assert 150 < sum(e["target_str"] == "injury" for e in diagnosis.examples) < 250


def test_toy_errors():
    with pytest.raises(ValueError, match="'test'"):
        make_toy("reverse", "test")
    with pytest.raises(ValueError, match="'nope'.*known"):
        make_toy("nope", "train")
    with pytest.raises(ValueError, match="fewer than"):  # topic has about 300 distinct validation inputs
        make_toy("topic", "validation", num_examples=400)


SCOPE_LINE = re.compile(r"^(D/TOY\w+/(?:TRAIN|EVAL))/build\.cls = @(\w+)\s*$", re.M)


def parse_toy_gin():
    """Parses toy.gin; `build` lines are skipped when colm.registry is not loaded."""
    try:
        gin.get_configurable("build")
        build_known = True
    except ValueError:
        build_known = False
    gin.parse_config_file(TOY_GIN, skip_unknown=[] if build_known else ["build"])
    with open(TOY_GIN) as f:
        scopes = SCOPE_LINE.findall(f.read())
    return scopes, build_known


def test_every_toy_gin_scope_builds(tiny_tok):
    tok = tiny_tok
    scopes, build_known = parse_toy_gin()
    names = [s for s, _ in scopes]
    assert len(names) == len(set(names))
    for task in toy.TASKS:
        for split in ("TRAIN", "EVAL") if task in toy.HELD_IN_TASKS else ("EVAL",):
            assert f"D/{toy.scope_name(task)}/{split}" in names
    for scope, cls_name in scopes:
        assert cls_name == "ToyDataset"
        if build_known:
            assert gin.query_parameter(f"{scope}/build.cls").configurable.wrapped is ToyDataset
        with gin.config_scope(scope):
            d = ToyDataset(name=scope)
        d.set_tokenizer(tok)
        item = d[len(d) - 1]
        assert item["dataset_name"] == scope and item["input_ids"][-1] == 1
        assert d.batch_size == 32 and d.max_length == 96
        mc = bool(d.examples[0]["answer_choices"])
        if scope.endswith("TRAIN"):
            assert (d.split, d.interface_info.interface, len(d)) == ("train", "lm", 1000)
        else:
            assert (d.split, len(d)) == ("validation", 200)
            assert d.interface_info.interface == ("mc" if mc else "gen")
            assert d.metrics == (["accuracy"] if mc else ["exact_match"])
            if not mc:
                longest = max(len(tokenize(tok, e["target_str"])) for e in d.examples)
                assert longest <= d.interface_info.max_gen_length
