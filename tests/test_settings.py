"""Which scopes, in which order (colm.datasets.settings) and how dataset families are found (colm.datasets.families)."""

import os
import subprocess

import pytest
from conftest import REPO_ROOT, subprocess_env

from colm.datasets import families, settings
from colm.datasets.settings import get_setting, is_listed, register_setting, scope_of, setting_containing
from colm.utils import model_types


def test_settings_counts_order_and_scopes():
    counts = {name: len(get_setting(name)) for name in ("P3", "Flanv2", "Niv2", "Add1", "All", "Full", "P3flanv2", "Toy")}
    assert counts == {"P3": 36, "Flanv2": 36, "Niv2": 75, "Add1": 19, "All": 147, "Full": 166, "P3flanv2": 72,
                      "Toy": 8}
    full = list(get_setting("Full"))
    assert full[0] == "P3Agnews" and full[35] == "P3Dbpedia14" and full[36] == "Flanv2zsAi2arceasy"
    assert full[72] == "Niv2zsTranslation" and full[146] == "Niv2zsMisc"
    assert full[147] == "P3Wscfixed" and full[153] == "P3Webquestions" and full[154] == "Flanv2zsQrecc"
    assert full[165] == "Flanv2zsWmt14translatefren"
    assert full[:147] == list(get_setting("All")) and len(set(full)) == 166
    assert get_setting("Full")["P3Agnews"] == "P3AGNEWS"
    assert get_setting("Full")["Flanv2zsAi2arceasy"] == "FLANV2AI2ARCEASY/ZS"
    assert get_setting("Full")["Niv2zsTranslation"] == "NIV2TRANSLATION/ZS"
    assert get_setting("Add1")["P3Wscfixed"] == "P3WSCFIXED"
    assert scope_of("ToyTopic") == "TOYTOPIC"
    toy_gin = open(os.path.join(REPO_ROOT, "colm/datasets/toy.gin")).read()
    assert all(f"D/{scope}/TRAIN" in toy_gin for scope in get_setting("Toy").values())


def test_get_setting_lists_and_errors():
    chosen = get_setting(["ToySummary", "P3Copa", "Niv2zsMisc"])
    assert list(chosen.items()) == [("ToySummary", "TOYSUMMARY"), ("P3Copa", "P3COPA"), ("Niv2zsMisc", "NIV2MISC/ZS")]
    get_setting("Full")["P3Agnews"] = "changed"  # a copy: the shared table stays intact
    assert get_setting("Full")["P3Agnews"] == "P3AGNEWS"
    with pytest.raises(ValueError, match="P3Agnews"):
        get_setting(["P3Agnew"])
    with pytest.raises(ValueError, match="Full"):
        get_setting("Ful")
    with pytest.raises(ValueError, match="more than once"):
        get_setting(["ToySummary", "ToySummary"])


def test_the_toy_family_declares_its_own_setting():
    from colm.datasets.toy import HELD_IN_TASKS, TOY_NAMES, scope_name

    assert TOY_NAMES == ("ToySentiment", "ToyTopic", "ToyDiagnosis", "ToyRuling", "ToyQa", "ToySummary", "ToyReverse",
                         "ToyInstrument")
    assert dict(get_setting("Toy")) == {name: scope_name(task) for name, task in zip(TOY_NAMES, HELD_IN_TASKS)}
    assert setting_containing("ToyQa") == "Toy" and setting_containing("P3Copa") == "Add1"
    assert is_listed("ToyQa") and not is_listed("MyEcho")
    with pytest.raises(ValueError, match="in none of the settings P3, Flanv2, Niv2, Add1, Toy"):
        setting_containing("MyEcho")


def test_register_setting(monkeypatch):
    monkeypatch.setattr(settings, "_REGISTERED", dict(settings._registered()))
    register_setting("Mine", ["MyEcho", "my-sum"])
    register_setting("Mapped", {"MyRev": "REVERSED/ZS"})
    assert dict(get_setting("Mine")) == {"MyEcho": "MYECHO", "my-sum": "MYSUM"}
    assert get_setting(["MyRev", "ToyQa"]) == {"MyRev": "REVERSED/ZS", "ToyQa": "TOYQA"}
    assert setting_containing("my-sum") == "Mine" and "Mine" in settings.all_settings()
    for name, experts, error in [("Toy", ["Other"], "exists already"), ("Full", ["Other"], "exists already"),
                                 ("Again", ["ToyQa"], "another setting"), ("Again", ["P3Copa"], "another setting"),
                                 ("Empty", [], "no experts"), ("Bad", ["a b"], "folder name")]:
        with pytest.raises(ValueError, match=error):
            register_setting(name, experts)


def test_suite_scopes_keep_the_paper_order():
    bbh = settings.suite_scopes("BBH")
    assert len(bbh) == 22 and bbh[0] == "D/BBBOOLEANEXPRESSIONS/EVAL" and bbh[-1] == "D/BBWORDSORTING/EVAL"
    assert len(settings.suite_scopes("BBLITE")) == 17
    assert settings.suite_scopes("HELDOUT")[7] == "D/P3ANLI/R1/EVAL"
    with pytest.raises(ValueError, match="close matches: \\['BBH'\\]"):
        settings.suite_scopes("BHH")


def test_every_dataset_module_is_found():
    names = families.module_names()
    assert {"colm.datasets.p3", "colm.datasets.flan", "colm.datasets.bigbench", "colm.datasets.toy",
            "colm.datasets.settings"} <= set(names)
    assert names == sorted(names)


def test_registry_files_pick_the_model_type_variant(tmp_path, monkeypatch):
    datasets_dir, models_dir = tmp_path / "colm" / "datasets", tmp_path / "colm" / "models"
    for folder in ("t5xl", "tiny", "other"):
        (models_dir / folder).mkdir(parents=True)
    datasets_dir.mkdir(parents=True)
    for name in ("p3_t5xl", "p3_tiny", "flanv2_t5xl", "bigbench", "toy", "my_family", "mine_other"):
        (datasets_dir / f"{name}.gin").write_text("")
    monkeypatch.setattr(families, "DATASETS_DIR", str(datasets_dir))
    monkeypatch.setattr(model_types, "MODELS_DIR", str(models_dir))
    monkeypatch.setattr(families, "REPO_ROOT", str(tmp_path))
    # p3 has a tiny variant, flanv2 falls back to t5xl, "my_family" is a family (no model type "family"), and
    # "mine" has a registry for the model type "other" only.
    base = ["colm/datasets/bigbench.gin", "colm/datasets/flanv2_t5xl.gin"]
    assert families.registry_files("tiny") == base + ["colm/datasets/my_family.gin", "colm/datasets/p3_tiny.gin",
                                                      "colm/datasets/toy.gin"]
    assert families.registry_files("t5xl") == base + ["colm/datasets/my_family.gin", "colm/datasets/p3_t5xl.gin",
                                                      "colm/datasets/toy.gin"]
    assert families.registry_files("other") == base + ["colm/datasets/mine_other.gin", "colm/datasets/my_family.gin",
                                                       "colm/datasets/p3_t5xl.gin", "colm/datasets/toy.gin"]
    monkeypatch.setenv("MODEL_TYPE", "tiny")
    assert "colm/datasets/p3_tiny.gin" in families.registry_files()


def test_launchers_and_python_name_the_same_registries():
    expected = ["colm/datasets/bigbench.gin", "colm/datasets/flanv2_t5xl.gin", "colm/datasets/p3_t5xl.gin",
                "colm/datasets/toy.gin"]
    assert families.registry_files("t5xl") == families.registry_files("tiny") == expected
    for model_type in ("t5xl", "tiny"):
        out = subprocess.run(
            ["bash", "-c", f"source colm/experiments/bash_scripts/_common.sh; model_type={model_type}; dataset_registries"],
            cwd=REPO_ROOT, env=subprocess_env(REPO_ROOT), capture_output=True, text=True, check=True,
        ).stdout
        assert out.split() == families.registry_files(model_type)
