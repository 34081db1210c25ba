"""Bring your own tasks and experts: a task family given as local JSON lines through -extra_gin_files, experts
with names of the user's choosing (colm.datasets.settings: "Name" or "Name:SCOPE"), the COLM_DATA_DIR override of a
LocalDataset path, and the build-time check of rank-classification scopes without answer choices."""

import json
import os
import re
import subprocess

import gin
import pytest
from conftest import REPO_ROOT, subprocess_env

from colm import registry
from colm.checkpoints.concatenate import commands_concatenate, run_concatenate
from colm.checkpoints.retrieval import make_checkpoint_for_retrieval
from colm.datasets.dataset import Dataset
from colm.datasets.local import LocalDataset
from colm.datasets.settings import derived_scope, expert_names, get_setting, setting_scopes
from colm.datasets.toy import TOY_NAMES
from colm.ginparse import parse_gin

EXAMPLE = "colm/experiments/examples/own_tasks"
OWN_GIN = f"{EXAMPLE}/own_tasks.gin"

# The README section "Your own tasks and experts" runs this block word for word (test_readme_section_matches).
README_BLOCK = """\
export MODEL_TYPE=tiny
MINE='colm/experiments/examples/own_tasks/own_tasks.gin'
MY2='["MyEcho", "MySentiment"]'
EVAL='P/EVALUATE/Evaluator.datasets=["D/MYECHO/EVAL", "D/MYSENTIMENT/EVAL"]'
FAST='P/TRAIN/Trainer.gradient_accumulation_factor=1 P/TRAIN/Trainer.num_steps=4 P/TRAIN/Trainer.validation_step_interval=50'
# a LoRA expert and its gate per task: the expert's name is yours, -dataset is the scope your gin file defines
for pair in MyEcho:MYECHO MySentiment:MYSENTIMENT; do
  name=${pair%%:*} scope=${pair##*:}
  bash colm/experiments/bash_scripts/train_single_task_loralinear.sh -exp_name ${name}_tiny_lora -dataset $scope \\
    -extra_gin_files $MINE -extra_bindings "$FAST"
  python scripts/manipulations.py --gin_bindings 'func_caller.func=@put_index_to_lora' \\
    "put_index_to_lora.path=\\"${name}_tiny_lora\\"" "put_index_to_lora.out_path=\\"datasets_concatenated/${name}_tiny_lora\\""
  bash colm/experiments/bash_scripts/train_gate.sh -exp_name datasets_concatenated/${name}_tiny_lora_inpgatetrainnogumbel \\
    -dataset $scope -old_exp_name datasets_concatenated/${name}_tiny_lora -extra_gin_files $MINE -extra_bindings "$FAST"
  python scripts/manipulations.py --gin_bindings 'func_caller.func=@use_input_gate_as_router' \\
    "use_input_gate_as_router.path=\\"datasets_concatenated/${name}_tiny_lora_inpgatetrainnogumbel\\""
done
# PHATGOOSE over your experts: concatenation needs only their names
python scripts/concatenate.py --gin_bindings "run_concatenate.datasets=$MY2" \\
  'run_concatenate.suffix="tiny_lora_inpgatetrainnogumbel"' 'run_concatenate.out_path="MyA2inpgatetrainnogumbel_tiny_lora_concatenated"'
bash colm/experiments/bash_scripts/eval_multitask.sh -exp_name MyA2inpgatetrainnogumbel_tiny_lora_concatenated \\
  -extra_gin_files $MINE -extra_bindings "$EVAL"
# Multitask and Retrieval over the same names: the launchers resolve them to your scopes
bash colm/experiments/bash_scripts/train_multitask.sh -exp_name MyMultitask_tiny_lora -dataset_setting "$MY2" \\
  -extra_gin_files $MINE -extra_bindings "$FAST"
bash colm/experiments/bash_scripts/retriever.sh -make_expert_library True -dataset_setting "$MY2" -dataset_length 16 \\
  -extra_gin_files $MINE
bash colm/experiments/bash_scripts/retriever.sh -create_checkpoint True -dataset_setting "$MY2" -dataset_length 16 \\
  -old_exp_name MyA2inpgatetrainnogumbel_tiny_lora_concatenated -exp_name MyCompleteansretrieval_tiny_lora_concatenated
bash colm/experiments/bash_scripts/retriever.sh -dataset_setting "$MY2" -dataset_length 16 \\
  -exp_name MyCompleteansretrieval_tiny_lora_concatenated -extra_gin_files $MINE -extra_bindings "$EVAL"
"""

MY_SCOPES = {"D/MYECHO/EVAL", "D/MYSENTIMENT/EVAL"}


def run_bash(args, cwd):
    return subprocess.run(["bash", *args], cwd=cwd, env=subprocess_env(cwd), capture_output=True, text=True)


# ------------------------------------------------------------------------------------------------ expert names


def test_names_of_your_own_resolve_to_the_scopes_your_gin_file_defines():
    parse_gin(["colm/datasets/toy.gin", OWN_GIN], [])
    setting = get_setting(["MyEcho", "Reviews:MYSENTIMENT", "ToyReverse", "Rev:D/MYSENTIMENT/EVAL", "my-echo"])
    assert list(setting.items()) == [("MyEcho", "MYECHO"), ("Reviews", "MYSENTIMENT"), ("ToyReverse", "TOYREVERSE"),
                                     ("Rev", "MYSENTIMENT"), ("my-echo", "MYECHO")]
    assert setting_scopes(["MyEcho", "Reviews:MYSENTIMENT"], split="TRAIN") == ["D/MYECHO/TRAIN", "D/MYSENTIMENT/TRAIN"]
    assert derived_scope("my-echo_2") == "MYECHO2"
    # a derived scope the gin files do not define, or an explicit one they do not define
    with pytest.raises(ValueError, match=r'D/REVIEWS/TRAIN.*"Name:SCOPE".*-extra_gin_files'):
        get_setting(["Reviews"])
    with pytest.raises(ValueError, match=r"'MYSENT'.*D/MYSENT/TRAIN"):
        get_setting(["MySentiment:MYSENT"])


def test_unknown_names_fail_with_how_to_name_the_scope_and_settings_are_unchanged():
    # No gin file loaded: a name outside the table has no scope to resolve to.
    with pytest.raises(ValueError, match=r"'MyEcho'.*D/MYECHO/TRAIN.*Name:SCOPE"):
        get_setting(["MyEcho"])
    with pytest.raises(ValueError, match=r"close matches: \['P3Agnews'"):
        get_setting(["P3Agnew"])
    for bad in (["my/echo"], ["MyEcho:my scope"], [""], [3]):
        with pytest.raises(ValueError, match="Name:SCOPE"):
            get_setting(bad)
    with pytest.raises(ValueError, match="more than once"):
        expert_names(["MyEcho", "MyEcho:OTHER"])
    # names only (concatenation): no registry needed
    assert expert_names(["MyEcho", "MySentiment:REVIEWS"]) == ["MyEcho", "MySentiment"]
    assert get_setting(["MyEcho", "MySentiment:REVIEWS"], check_scopes=False) == {"MyEcho": "MYECHO",
                                                                                 "MySentiment": "REVIEWS"}
    commands = commands_concatenate(["MyEcho", "MySentiment:REVIEWS"], stage="put_index_to_lora", suffix="tiny_lora")
    assert 'out_path="datasets_concatenated/MySentiment_tiny_lora"' in commands and "REVIEWS" not in commands
    with pytest.raises(FileNotFoundError, match=r"2 of 2 .*MyEcho_tiny_lora/best\.pt.*MySentiment_tiny_lora/best\.pt"):
        run_concatenate(datasets=["MyEcho", "MySentiment:REVIEWS"], suffix="tiny_lora", out_path="Mine",
                        expert_dir="nowhere_for_this_test")
    # a retrieval checkpoint over names of your own says how to make their libraries
    with pytest.raises(FileNotFoundError, match=r"""-dataset_setting '\["MyEcho", "MySentiment:REVIEWS"\]' """
                                                r"-extra_gin_files .* -dataset_length 16"):
        make_checkpoint_for_retrieval("Mine", "no_library_here", "MineRetrieval", 16, ["MyEcho", "MySentiment:REVIEWS"])
    # the named settings keep their names, order and scopes
    assert len(get_setting("Full")) == 166 and list(get_setting("Toy")) == list(TOY_NAMES)
    assert get_setting(["P3Agnews", "Flanv2zsBoolq"]) == {"P3Agnews": "P3AGNEWS", "Flanv2zsBoolq": "FLANV2BOOLQ/ZS"}


# ------------------------------------------------------------------------------------------------ data location


def _rows(path, n, word):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"input": f"repeat the word: {word}{i}", "target": f"{word}{i}"}) + "\n"
                            for i in range(n)))


def test_colm_data_dir_holds_relative_local_dataset_paths(tmp_path, monkeypatch):
    work, data = tmp_path / "work", tmp_path / "data"
    _rows(work / "mine/echo/train.jsonl", 5, "cwd")
    _rows(data / "mine/echo/train.jsonl", 3, "data")
    monkeypatch.chdir(work)
    monkeypatch.delenv("COLM_DATA_DIR", raising=False)
    here = LocalDataset(name="D/E/TRAIN", split="train", batch_size=1, path="mine/echo")
    assert len(here) == 5 and here.get_example(0)["target_str"] == "cwd0"
    # set: the copy under COLM_DATA_DIR wins over the current directory
    monkeypatch.setenv("COLM_DATA_DIR", str(data))
    there = LocalDataset(name="D/E/TRAIN", split="train", batch_size=1, path="mine/echo")
    assert there.path == str(data / "mine/echo") and len(there) == 3 and there.get_example(2)["target_str"] == "data2"
    # not under COLM_DATA_DIR: the current directory still serves
    _rows(work / "other/train.jsonl", 2, "only")
    assert len(LocalDataset(name="D/O/TRAIN", split="train", batch_size=1, path="other")) == 2
    with pytest.raises(FileNotFoundError, match=r"'nowhere' not found; looked in \[.*data/nowhere.*work/nowhere"):
        LocalDataset(name="D/N/TRAIN", split="train", batch_size=1, path="nowhere")


def test_the_shipped_example_reads_from_colm_data_dir_when_it_holds_a_copy(tmp_path, monkeypatch):
    copy = tmp_path / "data" / EXAMPLE / "echo"
    _rows(copy / "validation.jsonl", 2, "copy")
    monkeypatch.setenv("COLM_DATA_DIR", str(tmp_path / "data"))
    parse_gin([OWN_GIN], [])
    echo = registry.get_object("D/MYECHO/EVAL")
    assert len(echo) == 2 and echo.get_example(1)["target_str"] == "copy1"
    # the sentiment task has no copy there: read from the repository, with its answer choices
    reviews = registry.get_object("D/MYSENTIMENT/EVAL")
    assert len(reviews) == 8 and reviews.get_example(0)["answer_choices"] == ["negative", "positive"]
    assert reviews.path == os.path.join(EXAMPLE, "sentiment")


# ------------------------------------------------------------------------------------------------ build-time check


class _Listed(Dataset):
    def __init__(self, rows, **kwargs):
        self._rows = rows
        super().__init__(name="D/LISTED/EVAL", split="validation", batch_size=1, **kwargs)

    def load_data(self):
        self.examples = list(self._rows)


def _interface(kind):
    gin.clear_config()
    parse_gin([], [f'InterfaceInfo.interface="{kind}"'])


def test_rank_classification_without_answer_choices_is_refused_when_built(tmp_path):
    rows = [{"input_str": "a", "target_str": "yes", "answer_choices": []}]
    _interface("mc")
    with pytest.raises(ValueError, match=r"'D/LISTED/EVAL'.*\"mc\".*no answer choices.*interface = \"gen\""):
        _Listed(rows)
    assert len(_Listed([{**rows[0], "answer_choices": ["no", "yes"]}])) == 1
    _interface("gen")
    assert len(_Listed(rows)) == 1  # generation needs no choices
    # LocalDataset names the split's file and the column to bind
    (tmp_path / "t").mkdir()
    (tmp_path / "t/validation.jsonl").write_text(json.dumps({"input": "q", "target": "no", "opts": ["no", "yes"]}) + "\n")
    _interface("mc")
    with pytest.raises(ValueError, match=r"validation\.jsonl.*D/T/EVAL/LocalDataset\.answer_choices_field.*'opts'"):
        LocalDataset(name="D/T/EVAL", split="validation", batch_size=1, path=str(tmp_path / "t"))
    assert LocalDataset(name="D/T/EVAL", split="validation", batch_size=1, path=str(tmp_path / "t"),
                        answer_choices_field="opts").get_example(0)["answer_choices"] == ["no", "yes"]


@pytest.mark.slow
def test_launchers_refuse_a_choiceless_mc_scope_and_missing_gin_files_before_training(in_tmp_repo):
    gin_file = in_tmp_repo / "nochoice.gin"
    gin_file.write_text(open(os.path.join(REPO_ROOT, OWN_GIN)).read().replace("MYSENTIMENT", "NOCHOICE").replace(
        'D/NOCHOICE/LocalDataset.answer_choices_field = "choices"\n', ""))
    assert "NOCHOICE/LocalDataset.answer_choices_field" not in gin_file.read_text()
    done = run_bash(["colm/experiments/bash_scripts/train_single_task_loralinear.sh", "-exp_name", "nochoice",
                     "-dataset", "NOCHOICE", "-extra_gin_files", "nochoice.gin",
                     "-extra_bindings", "main.logging_backend=None P/TRAIN/Trainer.num_steps=4"], in_tmp_repo)
    assert done.returncode != 0
    message = done.stderr[-3000:]
    assert "'D/NOCHOICE/EVAL'" in message and "own_tasks/sentiment/validation.jsonl" in message, message
    assert 'D/NOCHOICE/EVAL/LocalDataset.answer_choices_field = "<column>"' in message and "['choices']" in message
    assert "P/TRAIN:" not in done.stderr + done.stdout  # refused while building, before any training step
    assert not (in_tmp_repo / "exp_out/nochoice/best.pt").exists()
    # a missing gin file is refused by the launcher itself
    missing = run_bash(["colm/experiments/bash_scripts/eval_multitask.sh", "-exp_name", "x",
                        "-extra_gin_files", f"{OWN_GIN} mine.gin"], in_tmp_repo)
    assert missing.returncode == 2 and "-extra_gin_files: no file 'mine.gin'" in missing.stderr


# ------------------------------------------------------------------------------------------------ end to end


def test_readme_section_matches():
    """The README section's bash block is this block, word for word; tests/test_readme.py replays it in a new
    shell, checking every launcher's and script's outputs."""
    readme = open(os.path.join(REPO_ROOT, "README.md")).read()
    section = readme.split("## Your own tasks and experts", 1)[1].split("\n## ", 1)[0]
    assert README_BLOCK in re.findall(r"```bash\n(.*?)```", section, flags=re.S)
