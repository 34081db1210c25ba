"""Where hub datasets load from (colm.datasets.hub), the local override, and the evaluation suites
(colm.datasets.settings)."""

import json
import os

import datasets as hf_datasets
import gin
import pytest

import colm.configurables  # noqa: F401  registers every configurable the registries name
from colm import registry
from colm.datasets import hub, settings
from colm.datasets.local import DATA_DIR_ENV

REGISTRIES = ["colm/datasets/p3_t5xl.gin", "colm/datasets/flanv2_t5xl.gin", "colm/datasets/bigbench.gin"]


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    return tmp_path


def test_local_override_reads_name_and_config_folder(data_dir):
    write_jsonl(data_dir / "super_glue" / "rte" / "validation.jsonl", [{"premise": "p", "hypothesis": "h", "label": 0}])
    rows = hub.load_hf_split(["huggingface", "super_glue", "rte"], "validation")
    assert rows.column_names == ["premise", "hypothesis", "label"]
    assert rows[0]["premise"] == "p"


def test_train_validation_is_train_then_validation(data_dir):
    write_jsonl(data_dir / "tasksource" / "bigbench" / "navigate" / "train.jsonl", [{"inputs": "a"}, {"inputs": "b"}])
    write_jsonl(data_dir / "tasksource" / "bigbench" / "navigate" / "validation.jsonl", [{"inputs": "c"}])
    rows = hub.load_hf_split(["tasksource/bigbench", "navigate"], "train_validation")
    assert rows["inputs"] == ["a", "b", "c"]


def test_save_to_disk_copy_is_read_too(data_dir):
    hf_datasets.DatasetDict({"test": hf_datasets.Dataset.from_dict({"text": ["x", "y"], "label": [1, 0]})}).save_to_disk(
        str(data_dir / "ag_news")
    )
    assert hub.load_hf_split(["ag_news"], "test")["text"] == ["x", "y"]


def test_hub_loads_go_to_the_current_repository(monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    calls = []

    def fake_load_dataset(path, name=None, split=None, revision=None):
        calls.append((path, name, split, revision))
        return hf_datasets.Dataset.from_dict({"x": [1]})

    monkeypatch.setattr(hf_datasets, "load_dataset", fake_load_dataset)
    hub.load_hf_split(["huggingface", "ag_news"], "test")
    hub.load_hf_split(["super_glue", "rte"], "validation")
    hub.load_hf_split(["social_i_qa"], "validation")
    hub.load_hf_split(["some_org/unmapped", "cfg"], "train")
    assert calls[0] == ("fancyzhx/ag_news", None, "test", None)
    assert calls[1] == ("aps/super_glue", "rte", "validation", None)
    assert calls[2] == ("allenai/social_i_qa", None, "validation", "refs/convert/parquet")
    assert calls[3] == ("some_org/unmapped", "cfg", "train", None)


def test_hub_failure_says_how_to_work_offline(monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(hf_datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match=r"glue/mrpc.*nyu-mll/glue.*COLM_DATA_DIR/glue/mrpc"):
        hub.load_hf_split(["glue", "mrpc"], "validation")


def test_local_only_dataset_names_the_manual_step(data_dir):
    with pytest.raises(FileNotFoundError, match="manual download.*story_cloze/2016"):
        hub.load_hf_split(["story_cloze", "2016"], "validation")


def test_empty_dataset_path_is_an_error():
    with pytest.raises(ValueError, match="names no dataset"):
        hub.load_hf_split(["huggingface"], "train")


def registry_scopes():
    gin.clear_config()
    try:
        gin.parse_config_files_and_bindings(REGISTRIES, [])
        return set(registry.known_scopes())
    finally:
        gin.clear_config()


def test_every_suite_scope_is_defined_in_the_registries():
    known = registry_scopes()
    for name, scopes in settings.SUITES.items():
        missing = [s for s in scopes if f"D/{s}/EVAL" not in known]
        assert not missing, f"suite {name} names undefined scopes {missing}"


def test_every_expert_of_the_flan_setting_has_train_and_eval_scopes():
    known = registry_scopes()
    full = settings.get_setting("Full")
    assert len(full) == 166
    missing = [f"D/{scope}/{split}" for scope in full.values() for split in ("TRAIN", "EVAL")
               if f"D/{scope}/{split}" not in known]
    assert not missing


def test_suite_procedures_win_over_the_launcher_default_datasets():
    """eval_multitask.sh binds P/EVALUATE/Evaluator.datasets; P/EVALUATE/BBH must still evaluate BBH."""
    import colm.main  # noqa: F401  registers main, named by eval.gin
    from colm.procedures.evaluator import Evaluator

    gin.clear_config()
    try:
        gin.parse_config_files_and_bindings(
            REGISTRIES + ["colm/experiments/eval.gin"],
            ["P/EVALUATE/Evaluator.datasets = @P/EVALUATE/setting_scopes()", 'P/EVALUATE/setting_scopes.setting = "P3"'],
        )
        for suite in ("HELDOUT", "BBH", "BBLITE"):
            with gin.config_scope(f"P/EVALUATE/{suite}"):
                assert Evaluator(name=suite).datasets == settings.suite_scopes(suite)
        with gin.config_scope("P/EVALUATE"):
            assert len(Evaluator(name="default").datasets) == 36
    finally:
        gin.clear_config()
