"""BIG-bench datasets (spec 6.4, 6.7): the registry against the spec tables, items from hub-format rows,
BIG-bench's own formatting re-implemented from task.json, the installed package, and an evaluation run."""

import importlib.util
import json
import os
import subprocess
import warnings

import gin
import pytest
from conftest import subprocess_env, write_random_moe_checkpoint

from colm import registry
from colm.datasets import bigbench_package as bbp
from colm.datasets.bigbench import BigBenchDataset, BigBenchSampleDataset
from colm.datasets.local import DATA_DIR_ENV
from colm.ginparse import parse_gin
from colm.procedures.results import read_results

HERE = os.path.dirname(os.path.abspath(__file__))
HUB_FIXTURES = os.path.join(HERE, "fixtures", "hub")
FAKE_PACKAGE = os.path.join(HERE, "fixtures", "bigbench")
REGISTRY = "colm/datasets/bigbench.gin"

# Spec 6.7, transcribed: scope -> (hub dataset, task, interface, metrics, eval batch, max_gen_length, choices).
T, S = "tasksource/bigbench", "lukaemon/bbh"
SPEC = {
    "BBBOOLEANEXPRESSIONS": (S, "boolean_expressions", "mc", ["accuracy"], 32, None, ["True", "False"]),
    "BBCAUSALJUDGEMENT": (T, "causal_judgment", "mc", ["accuracy"], 16, None, None),
    "BBDATEUNDERSTANDING": (T, "date_understanding", "mc", ["accuracy"], 32, None, None),
    "BBDISAMBIGUATIONQA": (T, "disambiguation_qa", "mc", ["accuracy"], 32, None, None),
    "BBFORMALFALLACIES": (T, "formal_fallacies_syllogisms_negation", "mc", ["accuracy"], 32, None, None),
    "BBGEOMETRICSHAPES": (T, "geometric_shapes", "mc", ["accuracy_multiple_ans"], 8, None, None),
    "BBHYPERBATON": (T, "hyperbaton", "mc", ["accuracy"], 32, None, None),
    "BBLOGICALDEDUCTION": (T, "logical_deduction", "mc", ["accuracy"], 8, None, None),
    "BBMOVIERECOMMENDATION": (T, "movie_recommendation", "mc", ["accuracy"], 16, None, None),
    "BBMULTISTEPARITHMETICTWO": (S, "multistep_arithmetic_two", "gen", ["exact_match"], 32, 8, None),
    "BBNAVIGATE": (T, "navigate", "mc", ["accuracy"], 32, None, None),
    "BBOBJECTCOUNTING": (T, "object_counting", "gen", ["exact_match_multiple_ans"], 32, 8, None),
    "BBPENGUINSINATABLE": (T, "penguins_in_a_table", "mc", ["accuracy"], 16, None, None),
    "BBREASONINGABOUTCOLOREDOBJECTS": (T, "reasoning_about_colored_objects", "mc", ["accuracy_multiple_ans"], 4, None,
                                       None),
    "BBRUINNAMES": (T, "ruin_names", "mc", ["accuracy"], 16, None, None),
    "BBSALIENTTRANSLATIONERRORDETECTION": (T, "salient_translation_error_detection", "mc", ["accuracy"], 4, None, None),
    "BBSNARKS": (T, "snarks", "mc", ["accuracy"], 32, None, None),
    "BBSPORTSUNDERSTANDING": (T, "sports_understanding", "mc", ["accuracy"], 32, None, None),
    "BBTEMPORALSEQUENCES": (T, "temporal_sequences", "mc", ["accuracy"], 16, None, None),
    "BBTRACKINGSHUFFLEDOBJECTS": (T, "tracking_shuffled_objects", "mc", ["accuracy"], 8, None, None),
    "BBWEBOFLIES": (S, "web_of_lies", "mc", ["accuracy"], 32, None, ["Yes", "No"]),
    "BBWORDSORTING": (T, "word_sorting", "gen", ["exact_match"], 32, 128, None),
    "BBBBQLITEJSON": (T, "bbq_lite_json", "mc", ["accuracy"], 16, None, None),
    "BBCONCEPTUALCOMBINATIONS": (T, "conceptual_combinations", "mc", ["accuracy"], 32, None, None),
    "BBCONLANGTRANSLATION": (T, "conlang_translation", "gen", ["rouge"], 32, 64, None),
    "BBHINDUKNOWLEDGE": (T, "hindu_knowledge", "mc", ["accuracy"], 32, None, None),
    "BBKNOWNUNKNOWNS": (T, "known_unknowns", "mc", ["accuracy"], 32, None, None),
    "BBLINGUISTICSPUZZLES": (T, "linguistics_puzzles", "gen", ["exact_match"], 32, 128, None),
    "BBLOGICGRIDPUZZLE": (T, "logic_grid_puzzle", "mc", ["accuracy"], 4, None, None),
    "BBNOVELCONCEPTS": (T, "novel_concepts", "mc", ["accuracy_multiple_ans"], 16, None, None),
    "BBOPERATORS": (T, "operators", "gen", ["exact_match"], 32, 4, None),
    "BBPLAYDIALOGSAMEORDIFFERENT": (T, "play_dialog_same_or_different", "mc", ["accuracy"], 16, None, None),
    "BBREPEATCOPYLOGIC": (T, "repeat_copy_logic", "gen", ["exact_match"], 32, 64, None),
    "BBSTRANGESTORIES": (T, "strange_stories", "mc", ["accuracy"], 16, None, None),
    "BBSTRATEGYQA": (T, "strategyqa", "mc", ["accuracy"], 32, None, None),
    "BBVITAMINCFACTVERIFICATION": (T, "vitaminc_fact_verification", "mc", ["accuracy"], 8, None, None),
    "BBWINOWHY": (T, "winowhy", "mc", ["accuracy"], 32, None, None),
    "BBDYCKLANGUAGES": (T, "dyck_languages", "mc", ["accuracy"], 1, None, None),
    "BBAUTODEBUGGING": (T, "auto_debugging", "gen", ["exact_match_multiple_ans"], 32, 32, None),
    "BBCODELINEDESCRIPTION": (T, "code_line_description", "mc", ["accuracy"], 32, None, None),
    "BBEMOJIMOVIE": (T, "emoji_movie", "mc", ["accuracy"], 32, None, None),
    "BBLANGUAGEIDENTIFICATION": (T, "language_identification", "mc", ["accuracy"], 2, None, None),
    "BBMISCONCEPTIONSRUSSIAN": (T, "misconceptions_russian", "mc", ["accuracy"], 32, None, None),
    "BBPARSINLUREADINGCOMPREHENSION": (T, "parsinlu_reading_comprehension", "gen", ["exact_match_multiple_ans"], 32,
                                       128, None),
    "BBSYMBOLINTERPRETATION": (T, "symbol_interpretation", "mc", ["accuracy"], 8, None, None),
}

PACKAGE_INSTALLED = importlib.util.find_spec("bigbench") is not None and bbp.tasks_root() is not None
needs_package = pytest.mark.skipif(not PACKAGE_INSTALLED, reason="bigbench package not installed "
                                   "(bash exp_launch/install_bigbench.sh)")


@pytest.fixture(scope="module")
def byt5():
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer()


@pytest.fixture
def hub_fixtures(monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, HUB_FIXTURES)
    monkeypatch.delenv(bbp.PACKAGE_ENV, raising=False)


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def fixture_rows(hub, task):
    folder = os.path.join(HUB_FIXTURES, hub, task)
    if hub == S:
        return read_jsonl(os.path.join(folder, "test.jsonl"))
    return read_jsonl(os.path.join(folder, "train.jsonl")) + read_jsonl(os.path.join(folder, "validation.jsonl"))


def build(scope, bindings=()):
    gin.clear_config()
    registry.reset()
    parse_gin([REGISTRY], list(bindings))
    return registry.get_object(scope)


# ---- (a) the registry, built from hub-format fixture rows ------------------------------------------------


def test_registry_defines_exactly_the_spec_scopes():
    parse_gin([REGISTRY], [])
    assert sorted(registry.known_scopes()) == sorted(f"D/{name}/EVAL" for name in SPEC)


def test_every_scope_from_hub_rows(hub_fixtures, byt5):
    parse_gin([REGISTRY], ['D/BigBenchDataset.source = "hub"', 'D/BigBenchSampleDataset.source = "hub"'])
    scopes = registry.known_scopes()
    assert len(scopes) == len(SPEC) == 45
    for scope in scopes:
        hub, task, interface, metrics, batch_size, max_gen, fixed_choices = SPEC[scope.split("/")[1]]
        with gin.config_scope(scope.split("/")):
            ds = registry.build(name=scope)
        assert type(ds) is (BigBenchSampleDataset if hub == S else BigBenchDataset), scope
        assert (ds.hub_name, ds.task, ds.source) == (hub, task, "hub"), scope
        assert ds.split == ("test" if hub == S else "train_validation")
        assert (ds.interface_info.interface, ds.metrics, ds.batch_size, ds.max_length) == (
            interface, metrics, batch_size, 512), scope
        if max_gen is not None:
            assert ds.interface_info.max_gen_length == max_gen, scope
        ds.set_tokenizer(byt5)
        rows = fixture_rows(hub, task)
        assert len(ds) == len(rows) >= 3, scope
        for i, row in enumerate(rows):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                item = ds[i]
            if hub == S:
                assert item["input_str"] == row["input"] + "\nAnswer:"
                assert item["target_str"] == row["target"] and item["references"] == [row["target"]]
                assert item["answer_choices"] == (fixed_choices or [])
                assert item["multi_label"] is None
                expected_label = fixed_choices.index(row["target"]) if fixed_choices else -1
                assert item["label"] == expected_label, scope
                continue
            assert item["input_str"] == (row["inputs"] or "<NO INPUT>") + "\nAnswer:", scope
            longest = max(row["targets"], key=len)
            assert item["target_str"] == longest
            if "exact_match_multiple_ans" in metrics:
                assert item["references"] == row["targets"]
            else:
                assert item["references"] == row["targets"][:1]
            choices = row["multiple_choice_targets"]
            assert item["answer_choices"] == choices
            if choices:
                gold = [k for k, s in enumerate(row["multiple_choice_scores"]) if s == 1]
                assert item["multi_label"] == gold and gold, scope
                if longest in choices:
                    assert item["label"] == choices.index(longest), scope
                else:
                    assert 0 <= item["label"] < len(choices)
                assert len(item["answer_choices_ids"]) == len(choices)
            else:
                assert item["multi_label"] is None and item["label"] == -1


def test_empty_inputs_become_no_input(hub_fixtures, byt5):
    ds = build("D/BBMISCONCEPTIONSRUSSIAN/EVAL", ['D/BigBenchDataset.source = "hub"'])
    ds.set_tokenizer(byt5)
    assert ds[0]["input_str"] == "<NO INPUT>\nAnswer:"
    assert ds[0]["target_str"] in ds[0]["answer_choices"]


def test_label_outside_gold_warns_once_per_dataset(tmp_path, monkeypatch, byt5):
    folder = tmp_path / "tasksource" / "bigbench" / "navigate"
    folder.mkdir(parents=True)
    row = {"idx": 0, "inputs": "Q: go?\nA:", "targets": ["b"], "multiple_choice_targets": ["a", "b"],
           "multiple_choice_scores": [1, 0]}
    (folder / "train.jsonl").write_text(json.dumps(row) + "\n" + json.dumps(dict(row, idx=1)) + "\n")
    (folder / "validation.jsonl").write_text(json.dumps(dict(row, idx=0)) + "\n")
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    ds = build("D/BBNAVIGATE/EVAL")  # source "auto" picks the local copy
    assert ds.source == "hub" and len(ds) == 3
    ds.set_tokenizer(byt5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        labels = [ds[i]["label"] for i in range(3)]
    assert labels == [1, 1, 1]
    assert len([w for w in caught if "not among the choices scored 1" in str(w.message)]) == 1


def test_max_examples_keeps_a_subset_lazily(hub_fixtures):
    ds = build("D/BBGEOMETRICSHAPES/EVAL", ['D/BigBenchDataset.source = "hub"',
                                             "D/BBGEOMETRICSHAPES/EVAL/BigBenchDataset.max_examples_per_dataset = 2"])
    assert len(ds) == 2
    inputs = {r["inputs"] for r in fixture_rows(T, "geometric_shapes")}
    assert all(ds.get_example(i)["input_str"][: -len("\nAnswer:")] in inputs for i in range(2))


def test_bbh_only_task_offline_names_the_package_source(tmp_path, monkeypatch):
    import datasets as hf_datasets

    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(hf_datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match=r'D/BBWEBOFLIES/EVAL/BigBenchSampleDataset.source = "package"'):
        build("D/BBWEBOFLIES/EVAL")


def test_bad_source_and_dataset_path_are_named():
    with pytest.raises(ValueError, match="source='web'"):
        BigBenchDataset(name="D/X/EVAL", dataset_path=[T, "navigate"], source="web")
    with pytest.raises(ValueError, match="should be"):
        BigBenchDataset(name="D/X/EVAL", dataset_path=[T], source="hub")


# ---- (b) BIG-bench's formatting, from a made-up package tree ----------------------------------------------


@pytest.fixture
def fake_package(monkeypatch):
    monkeypatch.setenv(bbp.PACKAGE_ENV, FAKE_PACKAGE)


def test_formatting_of_choices_prefixes_and_targets(fake_package):
    rows = bbp.PackageTaskRows.load("fake_choices", "all")
    assert len(rows) == 3  # the repeated "Sky?" example is dropped
    # Sorted choices [blue, green, red, white] permuted by RandomState(42).permutation(4) = [1, 3, 0, 2].
    assert rows[0] == {"idx": 0, "inputs": "Pick the colour.\n\nQ: Sky?\n  choice: green\n  choice: white\n"
                       "  choice: blue\n  choice: red\nA:", "targets": ["blue"],
                       "multiple_choice_targets": ["red", "blue", "green", "white"],
                       "multiple_choice_scores": [0, 1, 0, 0]}
    # No target: the first of the best-scored choices. Three choices: the permutation is the identity.
    assert rows[1] == {"idx": 1, "inputs": "Pick the colour.\n\nQ: Grass?\n  choice: green\n  choice: red\n"
                       "  choice: teal\nA:", "targets": ["green"],
                       "multiple_choice_targets": ["green", "teal", "red"], "multiple_choice_scores": [1, 1, 0]}
    assert rows[2]["inputs"] == "Pick the colour.\n\nQ: Snow?\n  choice: white\n  choice: black\nA:"
    assert rows[2]["targets"] == ["white", "pale white"] and rows[2]["idx"] == 2


def test_container_task_reads_subtasks_in_path_order(fake_package):
    rows = bbp.PackageTaskRows.load("fake_container", "all")
    assert [rows[i] for i in range(len(rows))] == [
        {"idx": 0, "inputs": "Echo:abc ->", "targets": ["abc"], "multiple_choice_targets": [],
         "multiple_choice_scores": []},
        {"idx": 1, "inputs": "Echo:   ->", "targets": ["x"], "multiple_choice_targets": [], "multiple_choice_scores": []},
        # append_choices_to_input "false" is a non-empty string: choices are appended, as BIG-bench does.
        {"idx": 0, "inputs": "Input: 1+1 | 3 | 2\nOutput:", "targets": ["2"], "multiple_choice_targets": ["2", "3"],
         "multiple_choice_scores": [1, 0]},
    ]
    assert [s.name for s in bbp.read_json_task("fake_container")] == ["fake_container:first", "fake_container:second"]
    with pytest.raises(ValueError, match="too few examples"):
        bbp.PackageTaskRows.load("fake_container", "train")


def test_train_validation_split_follows_the_seeded_shuffle(fake_package):
    # random.seed(42) shuffles range(20) to [19, 5, 14, 4, 9, 13, ...]; max(int(0.2 * 20), 16) = 16 validate.
    train = bbp.PackageTaskRows.load("fake_generative", "train")
    validation = bbp.PackageTaskRows.load("fake_generative", "validation")
    assert [train[i]["targets"] for i in range(len(train))] == [["19"], ["5"], ["14"], ["4"]]
    assert train[0]["inputs"] == "Q: n19\nA:" and [train[i]["idx"] for i in range(4)] == [0, 1, 2, 3]
    assert len(validation) == 16 and validation[0]["targets"] == ["9"] and validation[0]["idx"] == 0
    both = bbp.PackageTaskRows.load("fake_generative", "train_validation")
    assert [both[i] for i in range(len(both))] == [train[i] for i in range(4)] + [validation[i] for i in range(16)]
    picked = both.select([5, 0])
    assert [picked[0], picked[1]] == [validation[1], train[0]]


def test_package_rows_equal_hub_rows_for_the_same_examples(fake_package, byt5):
    """A tasksource-style row and the package row of the same task.json example give identical items."""
    ds = build("D/BBNAVIGATE/EVAL", ['D/BBNAVIGATE/EVAL/BigBenchDataset.dataset_path = ["tasksource/bigbench", '
                                     '"fake_choices"]', 'D/BBNAVIGATE/EVAL/BigBenchDataset.split = "all"',
                                     'D/BigBenchDataset.source = "package"'])
    ds.set_tokenizer(byt5)
    assert ds.source == "package" and len(ds) == 3
    item = ds[0]
    assert item["input_str"] == "Pick the colour.\n\nQ: Sky?\n  choice: green\n  choice: white\n  choice: blue\n" \
                                "  choice: red\nA:\nAnswer:"
    assert (item["target_str"], item["label"], item["multi_label"]) == ("blue", 1, [1])
    assert ds[2]["target_str"] == "pale white" and ds[2]["multi_label"] == [0]  # the longest target


def test_missing_package_and_task_are_explained(monkeypatch, tmp_path):
    monkeypatch.setenv(bbp.PACKAGE_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="install_bigbench.sh"):
        bbp.tasks_root()
    monkeypatch.setenv(bbp.PACKAGE_ENV, FAKE_PACKAGE)
    with pytest.raises(FileNotFoundError, match="did you mean \\['fake_choices'"):
        bbp.read_json_task("fake_choice")


def test_expression_evaluator_is_python_semantics_without_eval():
    assert bbp.evaluate_expression("not ( True and False ) or False") is True
    assert bbp.evaluate_expression("True and not not ( not True )") is False
    assert bbp.evaluate_expression("((8 - -3) * (5 + 1))") == 66
    with pytest.raises(ValueError, match="Unsupported"):
        bbp.evaluate_expression("__import__('os')")
    assert bbp.web_of_lies_answer("Millie lies. Teressa says Millie lies. Does Teressa tell the truth?")


# ---- (c) the installed bigbench package ------------------------------------------------------------------


def distinct_examples(task):
    """Examples per (sub)task file of the installed package, de-duplicated, counted independently."""
    folder = os.path.join(bbp.tasks_root(), task)
    with open(os.path.join(folder, "task.json"), encoding="utf-8") as f:
        data = json.load(f)
    files = [data]
    if "examples" not in data:
        files = []
        for sub in sorted(os.listdir(folder)):
            path = os.path.join(folder, sub, "task.json")
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as f:
                    files.append(json.load(f))
    return [len({json.dumps(e) for e in d["examples"]}) for d in files]


@needs_package
@pytest.mark.parametrize("scope", ["BBKNOWNUNKNOWNS", "BBNOVELCONCEPTS", "BBSTRANGESTORIES", "BBCONLANGTRANSLATION",
                                   "BBLOGICALDEDUCTION", "BBOBJECTCOUNTING", "BBSNARKS", "BBDATEUNDERSTANDING"])
def test_package_task_matches_task_json_counts_and_hub_rows(scope, monkeypatch, byt5):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    monkeypatch.delenv(bbp.PACKAGE_ENV, raising=False)
    ds = build(f"D/{scope}/EVAL")  # "auto" with the package installed and no local copy: the package
    assert ds.source == "package"
    assert len(ds) == sum(distinct_examples(ds.task))
    # The fixture rows (the first rows of each split, as tasksource/bigbench has them) come out unchanged.
    task = ds.task
    train = bbp.PackageTaskRows.load(task, "train")
    validation = bbp.PackageTaskRows.load(task, "validation")
    assert len(train) + len(validation) == len(ds)
    hub_train = read_jsonl(os.path.join(HUB_FIXTURES, T, task, "train.jsonl"))
    hub_validation = read_jsonl(os.path.join(HUB_FIXTURES, T, task, "validation.jsonl"))
    assert [train[i] for i in range(len(hub_train))] == hub_train
    assert [validation[i] for i in range(len(hub_validation))] == hub_validation
    ds.set_tokenizer(byt5)
    item = ds[0]
    assert item["input_str"] == hub_train[0]["inputs"] + "\nAnswer:"
    assert ds[len(train)]["input_str"] == hub_validation[0]["inputs"] + "\nAnswer:"  # validation follows train


@needs_package
def test_package_generates_the_bbh_only_tasks(monkeypatch, byt5):
    monkeypatch.delenv(bbp.PACKAGE_ENV, raising=False)
    sizes = {"BBBOOLEANEXPRESSIONS": 428, "BBWEBOFLIES": 1600, "BBMULTISTEPARITHMETICTWO": 100}
    for scope, size in sizes.items():
        ds = build(f"D/{scope}/EVAL", ['D/BigBenchSampleDataset.source = "package"'])
        ds.set_tokenizer(byt5)
        assert ds.source == "package" and len(ds) == size
        for i in (0, size // 2, size - 1):
            item = ds[i]
            text = item["input_str"][: -len("\nAnswer:")]
            if scope == "BBBOOLEANEXPRESSIONS":
                assert text.endswith(" is") and item["target_str"] == str(eval(text[: -len(" is")]))
                assert item["answer_choices"][item["label"]] == item["target_str"]
            elif scope == "BBMULTISTEPARITHMETICTWO":
                assert text.startswith("((") and text.endswith(") =")
                assert item["target_str"] == str(eval(text[: -len(" =")])) and item["label"] == -1
            else:
                assert text.startswith("Question: ") and text.endswith(" tell the truth?")
                assert item["answer_choices"] == ["Yes", "No"] and item["target_str"] in ("Yes", "No")


# ---- (d) end to end: eval_multitask.sh on BIG-bench tasks read from the package -------------------------

BBLITE_RUN = ["BBKNOWNUNKNOWNS", "BBNOVELCONCEPTS", "BBOPERATORS"]
BBH_RUN = ["BBLOGICALDEDUCTION", "BBOBJECTCOUNTING", "BBSNARKS"]


@pytest.mark.slow
@needs_package
def test_eval_multitask_on_bigbench_tasks_from_the_package(in_tmp_repo):
    write_random_moe_checkpoint(in_tmp_repo / "exp_out" / "bbtiny" / "best.pt")
    scopes = [f"D/{name}/EVAL" for name in BBLITE_RUN + BBH_RUN]
    bindings = " ".join(
        ["main.logging_backend=None", 'D/BigBenchDataset.source="package"',
         "P/EVALUATE/Evaluator.datasets=[" + ", ".join(f'"{s}"' for s in scopes) + "]"]
        + [f"{s}/BigBenchDataset.max_examples_per_dataset=8" for s in scopes])
    env = subprocess_env(in_tmp_repo)
    env.pop(DATA_DIR_ENV, None)
    env.pop(bbp.PACKAGE_ENV, None)
    done = subprocess.run(["bash", "colm/experiments/bash_scripts/eval_multitask.sh", "-exp_name", "bbtiny",
                           "-model_type", "tiny", "-extra_bindings", bindings],
                          cwd=in_tmp_repo, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = read_results(str(in_tmp_repo / "exp_out" / "bbtiny" / "results.txt"))[-1][1]
    for scope in scopes:
        _, _, interface, metrics, _, _, _ = SPEC[scope.split("/")[1]]
        keys = {"rougeL" if m == "rouge" else m for m in metrics}
        assert set(results[scope]) == keys | {"score"}, scope
        assert all(0.0 <= v <= 1.0 for v in results[scope].values()), (scope, results[scope])
    assert 0.0 <= results["average_score"] <= 1.0
