"""P3 datasets and the P3 registry (colm/datasets/p3.py, colm/datasets/p3_t5xl.gin) on tiny fixtures.

The fixtures under tests/fixtures/hub/<name>/<config>/<split>.jsonl hold rows in the raw hub schemas;
expected items are computed here from those rows with promptsource's own Template.apply.
"""

import functools
import json
import os
import random
import warnings

import gin
import numpy as np
import pytest
import transformers
from jinja2 import meta
from promptsource.templates import DatasetTemplates, env

from colm import registry
from colm.datasets import p3

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO_ROOT, "tests", "fixtures", "hub")
REGISTRY = os.path.join(REPO_ROOT, "colm", "datasets", "p3_t5xl.gin")

HELD_IN = """P3AGNEWS P3AMAZONPOLARITY P3COSMOSQA P3SAMSUM P3QUARTZ P3ROPES P3WIKIBIO P3PAWS P3WIKIQA P3SOCIALIQA
P3QASC P3QUAIL P3DREAM P3WIQA P3QUAREL P3SCIQ P3QUOREF P3DUORC P3ROTTENTOMATOES P3YELP P3COMMONGEN P3GIGAWORD
P3XSUM P3MRPC P3QQP P3COMMONSENSEQA P3COSE P3WIKIHOP P3HOTPOTQA P3APPREVIEWS P3TREC P3MULTINEWS P3IMDB
P3ADVERSARIALQA P3CNNDAILYMAIL P3DBPEDIA14""".split()
ADDED = "P3WSCFIXED P3COPA P3HSWAG P3WIC P3RACEHIGH P3RACEMIDDLE P3WEBQUESTIONS".split()
# held-out scope -> (promptsource dataset, ignored templates)
HELD_OUT = {
    "P3RTE": (("super_glue", "rte"), []),
    "P3HSWAG": (("hellaswag",), []),
    "P3COPA": (
        ("super_glue", "copa"),
        ["…which may be caused by", "…What could happen next, C1 or C2?", "…As a result, C1 or C2?", "…why? C1 or C2"],
    ),
    "P3WIC": (("super_glue", "wic"), []),
    "P3WINOGRANDE": (("winogrande", "winogrande_xl"), []),
    "P3CB": (("super_glue", "cb"), []),
    "P3STORYCLOZE": (("story_cloze", "2016"), []),
    "P3ANLI/R1": (("anli",), []),
    "P3ANLI/R2": (("anli",), []),
    "P3ANLI/R3": (("anli",), []),
    "P3WSCFIXED": (("super_glue", "wsc.fixed"), []),
}
CBK = "WIKIAUTO ELMGIGAWORD HAIKU COVIDQA ELI5 EMDG ESNLI TWITTER".split()
# Datasets whose references are a raw field rather than the target string.
REFERENCE_FIELDS = {
    "P3ADVERSARIALQA": lambda r: r["answers"]["text"],
    "P3QUOREF": lambda r: r["answers"]["text"],
    "P3ROPES": lambda r: r["answers"]["text"],
    "P3COMMONGEN": lambda r: [r["target"]],
    "P3MULTINEWS": lambda r: [r["summary"]],
    "P3SAMSUM": lambda r: [r["summary"]],
    "P3XSUM": lambda r: [r["summary"]],
    "P3GIGAWORD": lambda r: [r["summary"]],
    "P3HOTPOTQA": lambda r: [r["answer"]],
    "P3WIKIBIO": lambda r: [r["target_text"]],
    "P3CNNDAILYMAIL": lambda r: [r["highlights"]],
    "P3WEBQUESTIONS": lambda r: r["answers"],
}


@pytest.fixture
def fixtures_dir(monkeypatch):
    monkeypatch.setenv("COLM_DATA_DIR", FIXTURES)
    return FIXTURES


@pytest.fixture
def p3_registry(fixtures_dir):
    gin.parse_config_files_and_bindings([REGISTRY], [])
    return registry.known_scopes()


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.ByT5Tokenizer()


@functools.lru_cache(maxsize=None)
def templates_of(parts):
    """promptsource's own collection for (name[, config]), parsed once per test run."""
    return DatasetTemplates(*parts)


def fixture_rows(parts, split):
    path = os.path.join(FIXTURES, *parts, f"{split}.jsonl")
    with open(path) as f:
        return [json.loads(line) for line in f]


def expected_template_names(parts, include, ignore):
    """Template selection computed from promptsource directly."""
    collection = templates_of(tuple(parts))
    kept = [n for n in collection.all_template_names if n not in ignore]
    originals = [n for n in kept if collection[n].metadata.original_task]
    if include == "all":
        return kept
    if include == "original":
        return originals
    if isinstance(include, int):
        return [originals[include]]
    return [n for n in kept if n in include]


def expected_item(template, row, seed):
    """(input, target, choices) as promptsource renders them under the item's seed."""
    random.seed(seed)
    choices = template.get_answer_choices_list(row) or []
    random.seed(seed)
    parts = template.apply(row)
    if len(parts) != 2:
        return p3.NO_INPUT, p3.NO_INPUT, choices
    return parts[0], parts[1] or p3.NO_LABEL, choices


def build(scope, tokenizer):
    dataset = registry.get_object(scope)
    dataset.set_tokenizer(tokenizer)
    return dataset


def test_registry_defines_every_p3_scope(p3_registry):
    scopes = set(p3_registry)
    for name in HELD_IN + ADDED + ["P3MNLI", "P3SNLI", "P3COLA"]:
        assert {f"D/{name}/TRAIN", f"D/{name}/EVAL"} <= scopes, name
    for name, (parts, ignore) in HELD_OUT.items():
        count = len(expected_template_names(parts, "original", ignore))
        assert f"D/{name}/EVAL" in scopes
        assert {f"D/{name}/EVAL/T{k}" for k in range(count)} <= scopes, name
        assert f"D/{name}/EVAL/T{count}" not in scopes, name
    assert {f"D/{name}/EVAL" for name in CBK} | {"D/LUDWIG/ZS/EVAL"} <= scopes
    assert len(HELD_IN) == 36 and len(ADDED) == 7


def test_registry_follows_the_expert_order(p3_registry):
    from colm.datasets.settings import get_setting

    full = list(get_setting("Full").values())
    assert full[:36] == HELD_IN and full[147:154] == ADDED
    with open(REGISTRY) as f:
        text = f.read()
    for index, scope in list(enumerate(full))[:36] + list(enumerate(full))[147:154]:
        assert f"D/{scope}/TRAIN/build.cls" in text and f"# {index}: " in text, scope
        assert text.index(f"# {index}: ") < text.index(f"D/{scope}/TRAIN/build.cls"), scope


def _check_promptsource_items(scope, dataset):
    """Every item equals promptsource applied to the fixture row (independently read and rendered)."""
    parts = p3.path_parts(dataset.dataset_path)
    names = expected_template_names(parts, dataset.include_templates, dataset.ignore_templates)
    assert [name for name, _ in dataset.templates] == names, scope
    collection = templates_of(tuple(parts))
    rows = fixture_rows(parts, dataset.split)
    if isinstance(dataset, p3.P3AppReviewsDataset):
        rows = [rows[i] for i in p3.holdout_indices(len(rows), dataset.part, dataset.eval_size)]
    expected_len = len(rows) if dataset.round_robin_template else len(rows) * len(names)
    assert len(dataset) == expected_len, scope
    real_inputs = 0
    for i in range(len(dataset)):
        row_index, template_index = (i, i % len(names)) if dataset.round_robin_template else divmod(i, len(names))
        row = rows[row_index]
        if isinstance(dataset, p3.P3DuorcDataset) and not row["answers"]:
            row = dict(row, no_answer=True)
        want_input, want_target, want_choices = expected_item(
            collection[names[template_index]], row, p3.item_seed(dataset.seed, i)
        )
        item = dataset[i]
        assert (item["input_str"], item["target_str"]) == (want_input, want_target), (scope, i)
        assert item["answer_choices"] == want_choices, (scope, i)
        if want_choices:
            assert 0 <= item["label"] < len(want_choices)
            if want_target in want_choices:
                assert item["label"] == want_choices.index(want_target), (scope, i)
        else:
            assert item["label"] == -1
        refs = item["references"]
        assert isinstance(refs, list) and refs and all(isinstance(r, str) for r in refs), (scope, refs)
        name = scope.split("/")[1]
        if name in REFERENCE_FIELDS:
            assert refs == REFERENCE_FIELDS[name](rows[row_index]), (scope, i)
        elif name != "P3DUORC":
            assert refs == [want_target]
        real_inputs += item["input_str"] != p3.NO_INPUT
    assert real_inputs > 0 or len(dataset) == 0, scope


def _check_plain_items(scope, dataset):
    rows = fixture_rows(p3.path_parts(dataset.dataset_path), dataset.split)
    if isinstance(dataset, p3.LudwigDataset):
        assert len(dataset) == 6 * len(rows)
        for i in range(len(dataset)):
            item = dataset[i]
            row = rows[i // 6]
            assert row["utterance"] in item["input_str"] and row["response"] in item["input_str"]
            assert item["answer_choices"] == ["yes", "no"]
            assert item["target_str"] == row["implicature"].lower().rstrip(".")
            assert item["label"] == ["yes", "no"].index(item["target_str"])
    elif isinstance(dataset, p3.P3TrecDataset):
        assert len(dataset) == len(rows)
        for i, row in enumerate(rows):
            item = dataset[i]
            assert item["target_str"] == p3.TREC_FINE_LABELS[row["fine_label"]]
            assert item["answer_choices"] == list(p3.TREC_FINE_LABELS)
            assert item["label"] == row["fine_label"]
    else:  # CT0 generation sets
        if dataset.part is not None:
            rows = [rows[i] for i in p3.holdout_indices(len(rows), dataset.part, dataset.eval_size)]
        assert len(dataset) == len(rows)
        for i, row in enumerate(rows):
            item = dataset[i]
            assert (item["input_str"], item["target_str"], item["references"]) == (row["src"], row["tgt"], [row["tgt"]])
            assert item["answer_choices"] == [] and item["label"] == -1


@pytest.mark.slow
def test_every_registry_scope_builds_and_renders(p3_registry, tokenizer):
    assert p3_registry and all(s.startswith("D/") for s in p3_registry)
    plain = (p3.P3TrecDataset, p3.LudwigDataset, p3.CBKGenDataset)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for scope in p3_registry:
            dataset = build(scope, tokenizer)
            assert isinstance(dataset, p3.P3Dataset), scope
            if isinstance(dataset, plain):
                _check_plain_items(scope, dataset)
            else:
                _check_promptsource_items(scope, dataset)
    failures = [str(w.message) for w in caught if "failed" in str(w.message)]
    assert not failures, failures[:3]


def test_fixture_schemas_hold_every_field_the_templates_read():
    checked = set()
    for root, _, files in os.walk(FIXTURES):
        rel = tuple(os.path.relpath(root, FIXTURES).split(os.sep))
        if not files or rel[0] in ("ct0_data", "UCL-DARK", "trec", "tasksource", "lukaemon"):
            continue
        collection = DatasetTemplates(*rel)
        used = set()
        for name in collection.all_template_names:
            template = collection[name]
            used |= meta.find_undeclared_variables(env.parse(template.jinja))
            if template.answer_choices:
                used |= meta.find_undeclared_variables(env.parse(template.answer_choices))
        used.discard("answer_choices")
        for split_file in files:
            row = fixture_rows(rel, split_file[: -len(".jsonl")])[0]
            assert used <= set(row), (rel, split_file, used - set(row))
        checked.add(rel)
    assert len(checked) >= 45


def test_eval_scope_settings(p3_registry, tokenizer):
    # scope: (interface, max_gen_length or None, batch size, metrics, split)
    table = {
        "D/P3RTE/EVAL": ("mc", None, 32, ["accuracy"], "validation"),
        "D/P3HSWAG/EVAL": ("mc", None, 16, ["accuracy"], "validation"),
        "D/P3ANLI/R2/EVAL": ("mc", None, 32, ["accuracy"], "dev_r2"),
        "D/P3STORYCLOZE/EVAL": ("mc", None, 32, ["accuracy"], "test"),
        "D/P3SAMSUM/EVAL": ("gen", 128, 32, ["rouge"], "validation"),
        "D/P3WIKIBIO/EVAL": ("gen", 256, 32, ["bleu", "rouge"], "val"),
        "D/P3HOTPOTQA/EVAL": ("gen", 64, 32, ["bleu", "rouge"], "validation"),
        "D/P3DUORC/EVAL": ("gen", 64, 32, ["squad"], "validation"),
        "D/P3WIKIHOP/EVAL": ("mc", None, 4, ["accuracy"], "validation"),
        "D/P3TREC/EVAL": ("mc", None, 8, ["accuracy"], "test"),
        "D/P3CNNDAILYMAIL/EVAL": ("gen", 128, 8, ["bleu", "rouge"], "validation"),
        "D/P3APPREVIEWS/EVAL": ("mc", None, 32, ["accuracy"], "train"),
        "D/P3WEBQUESTIONS/EVAL": ("gen", 32, 32, ["rouge"], "test"),
        "D/WIKIAUTO/EVAL": ("gen", 128, 32, ["bleu"], "test"),
        "D/ELMGIGAWORD/EVAL": ("gen", 64, 32, ["rouge"], "test"),
        "D/COVIDQA/EVAL": ("gen", 128, 32, ["bertscore"], "train"),
        "D/LUDWIG/ZS/EVAL": ("mc", None, 32, ["accuracy"], "test"),
        "D/P3COPA/EVAL/T3": ("mc", None, 32, ["accuracy"], "validation"),
    }
    for scope, (interface, max_gen, batch_size, metrics, split) in table.items():
        dataset = build(scope, tokenizer)
        info = dataset.interface_info
        assert info.interface == interface, scope
        if max_gen is not None:
            assert info.max_gen_length == max_gen, scope
        assert (dataset.batch_size, dataset.metrics, dataset.split, dataset.max_length) == (
            batch_size,
            metrics,
            split,
            512,
        ), scope
    train = build("D/P3AGNEWS/TRAIN", tokenizer)
    assert train.interface_info.interface == "lm"
    assert (train.split, train.batch_size, train.max_examples_per_dataset) == ("train", 16, 500_000)
    assert train.include_templates == "all" and not train.round_robin_template
    held_in_eval = build("D/P3AGNEWS/EVAL", tokenizer)
    assert held_in_eval.include_templates == "original" and held_in_eval.round_robin_template
    assert not build("D/P3RTE/EVAL", tokenizer).round_robin_template


def test_rte_gpt3_style_literal(p3_registry, tokenizer):
    dataset = build("D/P3RTE/EVAL", tokenizer)
    names = [name for name, _ in dataset.templates]
    item = dataset[names.index("GPT-3 style")]  # row 0, template "GPT-3 style"
    assert item["input_str"] == (
        "The museum reopened in June after a two-year renovation of its east wing.\n"
        "Question: The museum was closed for renovation. True or False?"
    )
    assert item["target_str"] == "False" and item["answer_choices"] == ["True", "False"] and item["label"] == 1
    assert len(dataset) == 2 * 10


def test_trec_fixed_template(p3_registry, tokenizer):
    assert len(p3.TREC_FINE_LABELS) == len(set(p3.TREC_FINE_LABELS)) == 50
    item = build("D/P3TREC/EVAL", tokenizer)[1]
    assert item["input_str"] == (
        "Question: What does NASA stand for ?\nAnswer choices: " + ", ".join(p3.TREC_FINE_LABELS) + "\nAnswer:"
    )
    assert item["target_str"] == "ABBR:exp" and item["label"] == 1
    assert p3.TREC_FINE_LABELS[40] == "NUM:dist" and p3.TREC_FINE_LABELS[29] == "HUM:ind"


def _direct(cls=p3.P3Dataset, **kwargs):
    options = dict(name="D/TEST/EVAL", split="validation", batch_size=2, dataset_path=["super_glue", "rte"])
    options.update(kwargs)
    return cls(**options)


def test_app_reviews_train_and_eval_parts(fixtures_dir):
    common = dict(split="train", dataset_path=["app_reviews"], include_templates="all", eval_size=2)
    evaluation = _direct(p3.P3AppReviewsDataset, part="eval", round_robin_template=True, **common)
    training = _direct(p3.P3AppReviewsDataset, part="train", round_robin_template=True, **common)
    assert (len(evaluation), len(training)) == (2, 1)
    order = np.random.RandomState(1234).permutation(3)
    reviews = [r["review"] for r in fixture_rows(["app_reviews"], "train")]
    assert [evaluation.get_example(i)["_review"] for i in range(2)] == [reviews[j] for j in order[:2]]
    assert training.get_example(0)["_review"] == reviews[order[2]]
    with pytest.raises(ValueError, match="part"):
        _direct(p3.P3AppReviewsDataset, **common)


def test_duorc_unanswerable_rows(p3_registry, tokenizer):
    evaluation = build("D/P3DUORC/EVAL", tokenizer)
    assert evaluation.round_robin_template
    no_answer = evaluation.get_example(1)  # row 1 has no answer; template 1 of the 5 originals
    assert no_answer["template_name"] == "decide_worth_it"
    assert no_answer["target_str"] == "No I can't" and no_answer["references"] == ["No I can't"]
    assert evaluation.get_example(0)["references"] == ["on an island"]
    training = build("D/P3DUORC/TRAIN", tokenizer)
    names = [name for name, _ in training.templates]
    # a non-original template on the unanswerable row: the reference comes from original template 1 % 5
    item = training.get_example(len(names) + names.index("generate_question"))
    assert item["references"] == ["No I can't"]


def test_integer_include_templates_selects_the_kth_original(p3_registry, tokenizer):
    dataset = build("D/P3HSWAG/EVAL/T1", tokenizer)
    assert [name for name, _ in dataset.templates] == ["Randomized prompts template"]
    assert len(dataset) == 2 and dataset.interface_info.interface == "mc" and dataset.batch_size == 16
    with pytest.raises(ValueError, match="k-th original-task template"):
        _direct(include_templates=10)


def test_round_robin_and_all_pairs(fixtures_dir):
    pairs = _direct(include_templates="original")
    round_robin = _direct(include_templates="original", round_robin_template=True)
    assert (len(pairs), len(round_robin)) == (20, 2)
    names = [name for name, _ in pairs.templates]
    assert [round_robin.get_example(i)["template_name"] for i in range(2)] == names[:2]
    assert [pairs.get_example(i)["template_name"] for i in range(3)] == names[:3]
    assert pairs.get_example(10)["_idx"] == 1 and pairs.get_example(9)["_idx"] == 0
    with pytest.raises(IndexError):
        pairs.get_example(20)


def test_max_examples_samples_distinct_pairs_without_listing_them(fixtures_dir):
    capped = _direct(include_templates="all", max_examples_per_dataset=7)
    again = _direct(include_templates="all", max_examples_per_dataset=7)
    ids = capped.item_ids
    assert len(capped) == 7 and len(set(ids.tolist())) == 7 and ids.min() >= 0 and ids.max() < 20
    assert ids.tolist() == again.item_ids.tolist() and ids.tolist() == sorted(ids.tolist())
    assert [capped.get_example(i)["input_str"] for i in range(7)] == [again.get_example(i)["input_str"] for i in range(7)]
    # 10**12 pairs: a list of all flat indices would never fit; the draw must stay O(cap).
    capped.num_items = lambda: 10**12
    capped.truncate_dataset()
    assert len(capped.item_ids) == 7 and capped.item_ids.max() < 10**12
    pre = _direct(include_templates="original", max_pretemplate_examples_per_dataset=1)
    assert len(pre.data) == 1 and len(pre) == 10


def test_template_name_errors_and_ignore(fixtures_dir):
    with pytest.raises(ValueError, match="unknown template names.*'GPT-3 style'") as error:
        _direct(include_templates=["GPT-3 style", "no such template"])
    assert "no such template" in str(error.value)
    with pytest.raises(ValueError, match="ignore_templates names unknown"):
        _direct(ignore_templates=["not a template"])
    chosen = _direct(include_templates=["can we infer", "GPT-3 style"])
    assert [name for name, _ in chosen.templates] == ["GPT-3 style", "can we infer"]
    ignored = _direct(include_templates="all", ignore_templates=["GPT-3 style"])
    assert "GPT-3 style" not in [name for name, _ in ignored.templates] and len(ignored.templates) == 9
    with pytest.raises(ValueError, match="selects no template"):
        _direct(include_templates=["GPT-3 style"], ignore_templates=["GPT-3 style"])
    assert len(_direct(dataset_path=["huggingface", "super_glue", "rte"])) == 20


def test_copa_eval_ignores_the_four_conditional_templates(p3_registry, tokenizer):
    dataset = build("D/P3COPA/EVAL", tokenizer)
    names = [name for name, _ in dataset.templates]
    assert len(names) == 8 and not any(name.startswith("…") for name in names)
    assert len(build("D/P3COPA/TRAIN", tokenizer).templates) == 12


def test_failed_or_empty_renders_fall_back_and_warn_once(p3_registry, tokenizer):
    dataset = build("D/P3MRPC/TRAIN", tokenizer)  # generate_* templates render nothing for label-0 rows
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = [dataset[i] for i in range(len(dataset))]
    fallbacks = [item for item in items if item["input_str"] == p3.NO_INPUT]
    assert fallbacks and all(item["target_str"] == p3.NO_INPUT for item in fallbacks)
    messages = [str(w.message) for w in caught if "D/P3MRPC/TRAIN" in str(w.message)]
    assert len(messages) == len(set(messages)) == 2, messages  # one per template, not one per item


def test_references_are_flat_and_raw_fields_kept(p3_registry, tokenizer):
    web = build("D/P3WEBQUESTIONS/EVAL", tokenizer)
    assert web[1]["references"] == ["Seine", "River Seine"]
    adversarial = build("D/P3ADVERSARIALQA/EVAL", tokenizer).get_example(0)
    assert adversarial["references"] == ["every 27 days"] and adversarial["_answer_start"] == [24]
    assert adversarial["_context"].startswith("The Moon")
    assert build("D/P3XSUM/EVAL", tokenizer)[0]["references"] == ["A new cycle lane has been approved."]


def test_random_templates_render_the_same_every_time(p3_registry, tokenizer):
    dataset = build("D/P3ROPES/TRAIN", tokenizer)
    first = [dataset.get_example(i)["input_str"] + dataset.get_example(i)["target_str"] for i in range(len(dataset))]
    random.seed(123)
    assert first == [dataset.get_example(i)["input_str"] + dataset.get_example(i)["target_str"] for i in range(len(dataset))]


def test_local_only_sources_explain_what_is_missing(monkeypatch, tmp_path):
    monkeypatch.setenv("COLM_DATA_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="ct0_data/haiku"):
        _direct(p3.CBKGenDataset, split="test", dataset_path=["ct0_data", "haiku"])
    with pytest.raises(FileNotFoundError, match="story_cloze"):
        _direct(p3.P3StoryClozeDataset, split="test", dataset_path=["story_cloze", "2016"])


# ---- end to end: eval_multitask.sh on P3 scopes read from the fixtures ----------------------------------

E2E_SCOPES = ["D/P3AGNEWS/EVAL", "D/P3RTE/EVAL", "D/P3ROPES/EVAL", "D/P3WIKIBIO/EVAL"]


@pytest.mark.slow
def test_eval_multitask_scores_p3_scopes_from_local_copies(in_tmp_repo, fixtures_dir, tokenizer):
    """The launcher evaluates held-in (round robin), held-out (every original template), squad and bleu/rouge
    scopes; every example is the dataset's own item and the reported accuracy is the outputs' accuracy."""
    import subprocess

    from conftest import subprocess_env, write_random_moe_checkpoint

    from colm.procedures.results import read_results

    write_random_moe_checkpoint(in_tmp_repo / "exp_out" / "p3tiny" / "best.pt")
    bindings = ("main.logging_backend=None P/EVALUATE/Evaluator.datasets=[" + ", ".join(f'"{s}"' for s in E2E_SCOPES)
                + "] P/EVALUATE/Evaluator.analysis_processors=[@WriteOutputText()]")
    env = subprocess_env(in_tmp_repo)  # carries COLM_DATA_DIR (fixtures_dir)
    done = subprocess.run(["bash", "colm/experiments/bash_scripts/eval_multitask.sh", "-exp_name", "p3tiny",
                           "-model_type", "tiny", "-extra_bindings", bindings],
                          cwd=in_tmp_repo, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = read_results(str(in_tmp_repo / "exp_out" / "p3tiny" / "results.txt"))[-1][1]
    assert set(results["D/P3ROPES/EVAL"]) == {"squad_exact_match", "squad_f1", "score"}
    assert set(results["D/P3WIKIBIO/EVAL"]) == {"bleu", "rougeL", "score"}

    gin.parse_config_files_and_bindings([REGISTRY], [])
    for scope in E2E_SCOPES:
        dataset = build(scope, tokenizer)
        with open(in_tmp_repo / "exp_out" / "p3tiny" / "output_text" / (scope.replace("/", "_") + ".json")) as f:
            records = json.load(f)
        assert len(records) == len(dataset), scope
        for i, record in enumerate(records):
            item = dataset[i]
            assert (record["input_str"], record["target_str"]) == (item["input_str"], item["target_str"]), scope
            if "prediction" in record:
                assert (record["answer_choices"], record["label"]) == (item["answer_choices"], item["label"])
            else:
                assert record["references"] == item["references"]
        if "accuracy" in results[scope]:
            accuracy = np.mean([r["prediction"] == r["label"] for r in records])
            assert results[scope]["accuracy"] == round(float(accuracy), 3), scope
