"""The gin-wired core: scopes, building and linking, and errors that name the culprit."""

import gin
import pytest

from colm import registry
from colm.ginparse import parse_gin, split_bindings
from colm.main import main

TINY = ["colm/datasets/toy.gin", "colm/models/tiny/t5.gin", "colm/models/moe_lora_rank16.gin",
        "colm/experiments/train_single_task_loralinear.gin"]


def test_split_bindings_keeps_quoted_spaces_and_lists():
    text = 'a.b=1 c.d="two words" e.f=["x", "y"]\ng.h=\'q r\''
    assert split_bindings(text) == ["a.b=1", 'c.d="two words"', 'e.f=["x", "y"]', "g.h='q r'"]
    # the original launchers word-split lists; joining the pieces again must give the same bindings
    assert split_bindings("\n".join(['e.f=["x",', '"y"]'])) == ['e.f=["x",\n"y"]']
    assert split_bindings("a.b = 1 c.d= 'x y' e.f =[1]") == ["a.b = 1", "c.d= 'x y'", "e.f =[1]"]
    with pytest.raises(ValueError, match="Unbalanced"):
        split_bindings('a.b="open')


def test_scopes_inherit_bindings_most_specific_wins():
    parse_gin(["colm/datasets/toy.gin"], ['D/ToyDataset.batch_size=7', 'D/TOYREVERSE/EVAL/ToyDataset.batch_size=3'])
    train = registry.get_object("D/TOYREVERSE/TRAIN")
    evaluation = registry.get_object("D/TOYREVERSE/EVAL")
    assert (train.batch_size, evaluation.batch_size) == (7, 3)
    assert (train.interface_info.interface, evaluation.interface_info.interface) == ("lm", "gen")
    assert registry.get_object("D/TOYREVERSE/TRAIN") is train  # cached: one object per name


def test_missing_gin_file_is_named():
    with pytest.raises(FileNotFoundError, match="no_such.gin"):
        parse_gin(["colm/datasets/toy.gin", "colm/no_such.gin"], [])


def test_unknown_configurable_and_parameter_are_named():
    with pytest.raises(ValueError, match="Trainerr"):
        parse_gin(TINY, ["P/TRAIN/Trainerr.num_steps=3"])
    gin.clear_config()
    with pytest.raises(ValueError, match="num_stepz"):
        parse_gin(TINY, ["P/TRAIN/Trainer.num_stepz=3"])


def test_unknown_scope_is_named_with_suggestions(monkeypatch):
    monkeypatch.setenv("EXP_NAME", "unused")
    parse_gin(TINY, ['P/TRAIN/Trainer.datasets="D/TOYREVERS/TRAIN"', 'P/EVALUATE/Evaluator.datasets="D/TOYREVERSE/EVAL"'])
    with pytest.raises(ValueError, match=r"D/TOYREVERS/TRAIN.*D/TOYREVERSE/TRAIN"):
        main(procedure_exec_order=["P/TRAIN"])
    with pytest.raises(ValueError, match="P/TRAINN"):
        main(procedure_exec_order=["P/TRAINN"])


def test_unset_environment_variable_is_named(monkeypatch):
    monkeypatch.delenv("DATASET", raising=False)
    monkeypatch.setenv("EXP_NAME", "unused")
    parse_gin(TINY, [])
    with pytest.raises(ValueError, match="DATASET"):
        main(procedure_exec_order=["P/TRAIN"])


def test_procedures_run_in_their_scope_so_overwrite_is_honoured(in_tmp_repo, monkeypatch):
    from colm.procedures.results import save_results

    monkeypatch.setenv("EXP_NAME", "scoped")
    gin.parse_config(["save_results.save_dir = 'exp_out/${EXP_NAME}'", "P/EVALUATE/save_results.overwrite = True"])

    from colm.procedures.procedure import Procedure

    class Writer(Procedure):
        def run(self):
            save_results({"x": 1})
            save_results({"x": 2})

    Writer("P/EVALUATE").run_in_scope()
    text = (in_tmp_repo / "exp_out/scoped/results.txt").read_text()
    assert text.count("Final results:") == 1 and "'x': 2" in text
    save_results({"x": 3})  # outside the scope: the unscoped default (append)
    assert (in_tmp_repo / "exp_out/scoped/results.txt").read_text().count("Final results:") == 2
