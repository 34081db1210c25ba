"""FLAN: building per-task folders from the Open-Orca/FLAN release, the NIV2 grouping, FlanDataset and its registry.

The fixture tests/fixtures/flan/release/ is a tiny release in the real layout (`<submix>_<type>_data/part.k.parquet`,
real columns) with rows for every task the registry names; niv2_categories.tsv maps one fixture task to each of
the 75 NIV2 categories (plus one to a category no expert reads; task999_no_category is in no mapping).
"""

import collections
import json
import os
import subprocess
import sys

import gin
import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import REPO_ROOT, subprocess_env
from transformers import ByT5Tokenizer

from colm import registry
from colm.datasets import flan_release, settings
from colm.datasets.flan import FlanDataset, split_rows, template_types
from colm.datasets.niv2_categories import (
    NIV2_CATEGORIES,
    CategoryLookup,
    categories_from_mapping_file,
    categories_from_tasks_dir,
)

FIXTURE = os.path.join(REPO_ROOT, "tests/fixtures/flan")
RELEASE = os.path.join(FIXTURE, "release")
CATEGORY_TSV = os.path.join(FIXTURE, "niv2_categories.tsv")
FLAN_GIN = os.path.join(REPO_ROOT, "colm/datasets/flanv2_t5xl.gin")
SST2 = "Flan2021/glue/sst2:2.0.0"
ZERO_SHOT = ("zs_opt", "zs_noopt")


# ---- the fixture, read independently of the code under test ------------------------------------------------


def _tsv_categories():
    lines = open(CATEGORY_TSV, encoding="utf-8").read().splitlines()[1:]
    known = {c.lower(): c for c in NIV2_CATEGORIES}
    return {task: known.get(cat.lower(), cat) for task, cat in (line.split("\t") for line in lines)}


def _destination(submix, task, categories):
    if submix == "flan":
        return f"Flan2021/{task}"
    if submix == "dialog":
        return f"Dialog/{task}"
    if submix == "niv2" and task in categories:
        return f"NIV2/{categories[task]}"
    return None


def release_rows():
    """{destination: [row dicts]} of every fixture release row that should be written."""
    categories = _tsv_categories()
    by_destination = collections.defaultdict(list)
    for folder in sorted(os.listdir(RELEASE)):
        submix = folder.split("_")[0]
        for part in sorted(os.listdir(os.path.join(RELEASE, folder))):
            for row in pq.read_table(os.path.join(RELEASE, folder, part)).to_pylist():
                destination = _destination(submix, row["_task_name"], categories)
                if destination is not None:
                    by_destination[destination].append(row)
    return dict(by_destination)


def kept_rows(rows, kinds=ZERO_SHOT):
    return [r for r in rows if r["_template_type"] in kinds and r["inputs"].strip() and r["targets"].strip()]


def row_key(row):
    return (row["inputs"], row["targets"], row["_template_type"], row["_task_name"])


@pytest.fixture(scope="module")
def expected():
    return release_rows()


@pytest.fixture(scope="module")
def cli_build(tmp_path_factory):
    """The command line run once on the whole fixture: (out_dir, stdout)."""
    out = tmp_path_factory.mktemp("flan_cli")
    done = subprocess.run(
        [sys.executable, "scripts/flan.py", "--release_dir", RELEASE, "--out_dir", str(out),
         "--niv2_categories", CATEGORY_TSV, "--no_progress"],
        cwd=REPO_ROOT, env=subprocess_env(REPO_ROOT), capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return str(out), done.stdout


@pytest.fixture
def data_dir(cli_build, monkeypatch):
    monkeypatch.setenv("COLM_DATA_DIR", cli_build[0])
    return cli_build[0]


def read_folder(out_dir, destination):
    from datasets import load_from_disk

    return load_from_disk(flan_release.flan_folder(out_dir, destination))["train"]


def texts(dataset):
    return [(dataset.get_example(i)["input_str"], dataset.get_example(i)["target_str"]) for i in range(len(dataset))]


def make(split="train", path=SST2, **kwargs):
    kwargs.setdefault("batch_size", 4)
    return FlanDataset(name="flan", split=split, dataset_path=f"FLANV2/{path}", **kwargs)


# ---- building the folders ---------------------------------------------------------------------------------


def test_cli_writes_every_destination_with_all_its_rows(cli_build, expected):
    out, stdout = cli_build
    assert "task999_no_category (4 rows)" in stdout  # NIV2 task with no category: reported, dropped
    assert "Unlisted Category" in stdout and "cot_zsopt_data" in stdout and "t0_zsopt_data" in stdout
    assert sorted(os.listdir(os.path.join(out, "FLANV2"))) == ["Dialog", "Flan2021", "NIV2"]  # no partial left
    niv2 = set(os.listdir(os.path.join(out, "FLANV2/NIV2")))
    assert niv2 == set(NIV2_CATEGORIES) | {"Unlisted Category"}
    for destination, rows in expected.items():
        stored = read_folder(out, destination)
        assert sorted(map(row_key, stored)) == sorted(map(row_key, rows)), destination
    # Grouping: both translation tasks land in the Translation category; "pos tagging" is spelled canonically.
    tasks = set(read_folder(out, "NIV2/Translation")["_task_name"])
    assert tasks == {"task100_fixture_translation", "task900_second_translation_task"}
    assert set(read_folder(out, "NIV2/Pos Tagging")["_task_name"]) == {"task129_fixture_pos_tagging"}


def test_registry_builds_every_flan_scope_with_fixture_rows(data_dir, expected):
    gin.parse_config_file(FLAN_GIN)
    scopes = set(registry.known_scopes())
    experts = [n for s in ("Flanv2", "Niv2", "Add1") for n in settings.get_setting(s) if not n.startswith("P3")]
    assert len(experts) == 36 + 75 + 12
    for name in experts:
        stem = settings.scope_of(name)
        assert {f"D/{stem}/TRAIN", f"D/{stem}/EVAL"} <= scopes, name
    assert len(scopes) == 2 * len(experts)
    tok = ByT5Tokenizer()
    seen_paths = set()
    for stem in sorted({s.rsplit("/", 1)[0] for s in scopes}):
        parts = {}
        for split_scope in ("TRAIN", "EVAL"):
            scope = f"{stem}/{split_scope}"
            with gin.config_scope(scope.split("/")):
                dataset = registry.build(name=scope)
            assert isinstance(dataset, FlanDataset) and dataset.max_length == 512
            dataset.set_tokenizer(tok)
            items = [dataset[i] for i in range(len(dataset))]
            for item in items:
                assert item["answer_choices"] == [] and item["references"] == [item["target_str"]]
                assert item["input_ids"][-1] == 1 and item["target_ids"][-1] == 1  # eos
            parts[split_scope] = [(it["input_str"], it["target_str"]) for it in items]
            info = dataset.interface_info
            if split_scope == "EVAL":
                assert (dataset.split, dataset.batch_size, dataset.metrics) == ("validation", 32, ["rouge"])
                assert info.interface == "gen" and info.max_gen_length > 1
            else:
                assert dataset.split == "train" and dataset.max_examples_per_dataset == 500_000
                assert info.interface == "lm" and dataset.batch_size in (2, 4, 8, 16)
        destination = dataset.dataset_path[len("FLANV2/"):]
        seen_paths.add(destination)
        want = [(r["inputs"], r["targets"]) for r in kept_rows(expected[destination])]
        train, validation = parts["TRAIN"], parts["EVAL"]
        assert len(validation) == min(int(0.1 * len(want)), 10_000) >= 1, stem
        assert not set(train) & set(validation)
        assert sorted(train + validation) == sorted(want), stem
    assert len(seen_paths) == len(experts)  # every expert reads its own folder


def test_zero_shot_filter_drops_blank_and_few_shot_rows(data_dir, expected):
    rows = expected[SST2]
    assert {r["_template_type"] for r in rows} == {"zs_opt", "zs_noopt", "fs_opt", "fs_noopt"}
    assert any(not r["targets"].strip() for r in rows) and any(not r["inputs"].strip() for r in rows)
    got = texts(make("train")) + texts(make("validation"))
    assert sorted(got) == sorted((r["inputs"], r["targets"]) for r in kept_rows(rows))
    assert all(inp.strip() and tgt.strip() for inp, tgt in got)


@pytest.mark.parametrize(
    "options,few_shot,kinds",
    [("all", False, ZERO_SHOT), ("opt", False, ("zs_opt",)), ("noopt", False, ("zs_noopt",)),
     ("all", True, ("fs_opt", "fs_noopt")), ("opt", True, ("fs_opt",))],
)
def test_answer_options_and_few_shot_select_template_types(data_dir, expected, options, few_shot, kinds):
    assert template_types(options, few_shot) == kinds
    parts = [make(split, answer_options=options, is_few_shot=few_shot) for split in ("train", "validation")]
    got = [p.get_example(i) for p in parts for i in range(len(p))]
    assert {ex["_template_type"] for ex in got} == set(kinds)
    want = kept_rows(expected[SST2], kinds)
    assert sorted((ex["input_str"], ex["target_str"]) for ex in got) == sorted((r["inputs"], r["targets"]) for r in want)


def test_bad_options_and_split_are_refused(data_dir):
    with pytest.raises(ValueError, match="answer_options"):
        make(answer_options="some")
    with pytest.raises(ValueError, match="split 'test'"):
        make(split="test")


def test_split_rule_and_determinism(data_dir):
    for n, n_val in [(0, 0), (9, 0), (95, 9), (200_000, 10_000)]:
        kept = np.arange(n) * 3
        train, validation = split_rows(kept, "train"), split_rows(kept, "validation")
        assert len(validation) == n_val and len(train) == n - n_val
        assert sorted(np.concatenate([train, validation]).tolist()) == kept.tolist()
        perm = np.random.RandomState(1234).permutation(n)
        assert validation.tolist() == kept[perm[:n_val]].tolist()
    assert texts(make("train")) == texts(make("train"))  # same order on every load
    assert texts(make("validation")) == texts(make("validation"))


def test_truncate_keeps_a_seeded_subset(data_dir):
    full = set(texts(make("train")))
    small = make("train", max_examples_per_dataset=5)
    assert len(small) == 5 and set(texts(small)) <= full
    assert texts(small) == texts(make("train", max_examples_per_dataset=5))
    assert texts(small) != texts(make("train", max_examples_per_dataset=5, seed=7))
    assert len(make("train", max_examples_per_dataset=10_000)) == len(full)


def test_dataset_path_as_list(data_dir):
    listed = FlanDataset(name="l", split="validation", batch_size=2, dataset_path=["FLANV2", "Flan2021", "glue/sst2:2.0.0"])
    assert texts(listed) == texts(make("validation"))


def test_missing_folder_says_how_to_build_it(tmp_path, monkeypatch):
    monkeypatch.delenv("COLM_DATA_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match=r"COLM_DATA_DIR is not set[\s\S]*python scripts/flan.py"):
        make()
    monkeypatch.setenv("COLM_DATA_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError) as error:
        make(path="NIV2/Translation")
    assert os.path.join(str(tmp_path), "FLANV2/NIV2/Translation") in str(error.value)
    assert "python scripts/flan.py" in str(error.value)


# ---- the builder as a library -----------------------------------------------------------------------------


def test_niv2_categories_from_task_files(tmp_path, expected):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "task100_fixture_translation.json").write_text(
        json.dumps({"Contributors": ["x"], "Categories": ["translation", "Misc."], "Instances": [{"id": 1}]}))
    # "Categories" after a long definition: found by reading the whole file.
    (tasks / "task900_second_translation_task.json").write_text(
        json.dumps({"Definition": ["d" * 70_000], "Categories": ["Translation"]}))
    (tasks / "README.md").write_text("not a task")
    mapping = categories_from_tasks_dir(str(tasks))
    assert mapping == {"task100_fixture_translation": "Translation", "task900_second_translation_task": "Translation"}
    report = flan_release.build_flan_folders(RELEASE, str(tmp_path / "out"), categories=mapping,
                                             submixes=("niv2",), progress=False)
    assert report.written == {"NIV2/Translation": len(expected["NIV2/Translation"])}
    assert report.uncategorised_niv2["task999_no_category"] == 4
    assert report.uncategorised_niv2["task101_fixture_program_execution"] > 0
    assert report.ignored_folders == ["cot_zsopt_data", "dialog_fsopt_data", "dialog_zsopt_data",
                                      "flan_fsnoopt_data", "flan_fsopt_data", "flan_zsnoopt_data",
                                      "flan_zsopt_data", "t0_zsopt_data"]
    assert "task999_no_category (4 rows)" in report.summary()


def test_category_mapping_files_and_lookup(tmp_path):
    assert len(NIV2_CATEGORIES) == len(set(NIV2_CATEGORIES)) == 75
    tsv = categories_from_mapping_file(CATEGORY_TSV)
    assert set(tsv.values()) == set(NIV2_CATEGORIES) | {"Unlisted Category"}
    as_json = tmp_path / "map.json"
    as_json.write_text(json.dumps({"task001_a.json": ["TEXT MATCHING", "Misc."], "task002_b": "Misc."}))
    lookup = CategoryLookup(categories_from_mapping_file(str(as_json)))
    assert lookup("task001_a") == "Text Matching" and lookup("task001_a.json") == "Text Matching"
    assert lookup("task002_renamed") == "Misc." and lookup("task003_c") is None
    bad = tmp_path / "bad.tsv"
    bad.write_text("task001_a Text Matching\n")
    with pytest.raises(ValueError, match="bad.tsv:1"):
        categories_from_mapping_file(str(bad))
    with pytest.raises(FileNotFoundError, match="natural-instructions"):
        categories_from_tasks_dir(str(tmp_path / "nowhere"))


def test_rerun_skips_complete_folders_and_overwrite_rebuilds(tmp_path):
    out = str(tmp_path)
    only = {SST2, "Dialog/qrecc"}
    first = flan_release.build_flan_folders(RELEASE, out, submixes=("flan", "dialog"), only=only, progress=False)
    assert set(first.written) == only
    marker = os.path.join(flan_release.flan_folder(out, SST2), "dataset_dict.json")
    stamp = os.stat(marker).st_mtime_ns
    again = flan_release.build_flan_folders(RELEASE, out, submixes=("flan", "dialog"), only=only, progress=False)
    assert again.written == {} and again.skipped_complete == sorted(only)
    # A full dialog run skips the complete folder and writes the others.
    dialog = flan_release.build_flan_folders(RELEASE, out, submixes=("dialog",), progress=False)
    assert dialog.skipped_complete == ["Dialog/qrecc"]
    assert set(dialog.written) == {"Dialog/qrecc_ii", "Dialog/wiki_dialog", "Dialog/wiki_dialog_ii"}
    assert os.stat(marker).st_mtime_ns == stamp
    # A half folder (no dataset_dict.json) is not complete: it is replaced; a stale partial is cleaned up.
    half = flan_release.flan_folder(out, "Flan2021/bool_q:1.0.0")
    os.makedirs(half)
    open(os.path.join(half, "junk"), "w").close()
    stale = os.path.join(out, "FLANV2", ".partial-999999999-dead")
    os.makedirs(stale)
    rebuilt = flan_release.build_flan_folders(RELEASE, out, submixes=("flan",), only={SST2, "Flan2021/bool_q:1.0.0"},
                                              overwrite=True, progress=False)
    assert set(rebuilt.written) == {SST2, "Flan2021/bool_q:1.0.0"}
    assert sorted(os.listdir(half)) == ["dataset_dict.json", "train"]
    assert os.stat(marker).st_mtime_ns != stamp and not os.path.exists(stale)


def test_interrupted_build_leaves_no_half_folder(tmp_path, monkeypatch):
    calls = []
    real_move = flan_release._move_into_place

    def move_then_die(staged, final, partial):
        if calls:
            raise KeyboardInterrupt
        calls.append(final)
        real_move(staged, final, partial)

    monkeypatch.setattr(flan_release, "_move_into_place", move_then_die)
    with pytest.raises(KeyboardInterrupt):
        flan_release.build_flan_folders(RELEASE, str(tmp_path), submixes=("dialog",), progress=False)
    done = [d for d in ("qrecc", "qrecc_ii", "wiki_dialog", "wiki_dialog_ii")
            if os.path.exists(os.path.join(tmp_path, "FLANV2/Dialog", d))]
    assert len(done) == 1 and flan_release.is_complete(calls[0])
    assert sorted(os.listdir(tmp_path / "FLANV2")) == ["Dialog"]  # the partial folder is gone


def test_release_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="Open-Orca/FLAN"):
        flan_release.build_flan_folders(str(tmp_path / "none"), str(tmp_path), progress=False)
    with pytest.raises(ValueError, match="--niv2_tasks_dir"):
        flan_release.build_flan_folders(RELEASE, str(tmp_path), progress=False)
    broken = tmp_path / "release" / "flan_zsopt_data"
    broken.mkdir(parents=True)
    table = pq.read_table(os.path.join(RELEASE, "dialog_fsopt_data/part.0.parquet")).drop_columns(["targets"])
    pq.write_table(table, broken / "part.0.parquet")
    with pytest.raises(KeyError, match=r"lacks column\(s\) \['targets'\]"):
        flan_release.build_flan_folders(str(tmp_path / "release"), str(tmp_path / "out"), progress=False)
