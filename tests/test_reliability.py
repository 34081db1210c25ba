"""Faults that used to slip through, each refused with an error naming the thing and the fix (issue 12;
the table in docs/reliability.md lists them with their messages)."""

import errno
import pickle

import gin
import pytest
import torch

from colm import registry
from colm.checkpoints import experts
from colm.checkpoints.averaged_hiddens import insert_averaged_hiddens
from colm.formats.checkpoint_io import read_checkpoint, write_checkpoint
from colm.ginparse import parse_gin
from colm.main import main
from colm.moma.lora import modify_with_lora
from colm.moma.weights import load_state_into

GINS = ["colm/datasets/toy.gin", "colm/models/tiny/t5.gin", "colm/models/moe_lora_rank16.gin",
        "colm/experiments/train_single_task_loralinear.gin"]
SMALL = ['P/TRAIN/Trainer.datasets="D/TOYSENTIMENT/TRAIN"', 'P/EVALUATE/Evaluator.datasets="D/TOYSENTIMENT/EVAL"',
         "D/ToyDataset.batch_size=4", "D/TOYSENTIMENT/TRAIN/ToyDataset.num_examples=16",
         "D/TOYSENTIMENT/EVAL/ToyDataset.num_examples=4", "P/TRAIN/Trainer.gradient_accumulation_factor=1",
         "main.logging_backend=None"]


class Payload:
    """Unpickling it creates the file `marker`: proof that a load ran code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def lora(model):
    modify_with_lora(model, lora_modules=".*SelfAttention|.*EncDecAttention|.*DenseReluDense", lora_layers="q|k|v|o|w.*")


def lora_state(model):
    return {k: v.detach().clone() + 0.01 for k, v in model.torch_model.state_dict().items() if "expert_lora" in k}


# ----- checkpoint loading -------------------------------------------------------------------------------


def test_nan_in_a_checkpoint_is_refused_naming_the_module(make_model):
    model = make_model([lora], trainable_params="none")
    state = lora_state(model)
    key = "decoder.block.0.layer.1.EncDecAttention.v.expert_lora_b"
    state[key][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"x\.pt: .*module decoder\.block\.0\.layer\.1\.EncDecAttention\.v.* 1 NaN/Inf"):
        load_state_into(model, state, "x.pt")


def test_empty_and_half_checkpoints_are_refused_when_nothing_else_sets_the_missing_tensors(make_model, capsys):
    model = make_model([lora], trainable_params="none")
    with pytest.raises(ValueError, match="holds no tensors"):
        load_state_into(model, {}, "empty.pt")
    state = lora_state(model)
    half = {k: v for k, v in state.items() if k.startswith("encoder.")}
    missing = len(state) - len(half)
    with pytest.raises(KeyError, match=rf"half\.pt lacks {missing} of the {len(state)} expert tensors"):
        load_state_into(model, half, "half.pt")
    # A model that trains them has another source: the load reports the count and goes on.
    trained = make_model([lora], trainable_params="expert")
    load_state_into(trained, half, "half.pt")
    assert f"{missing} of the {len(state)} expert tensors this model expects are not in it" in capsys.readouterr().out


def test_corrupt_and_crafted_checkpoints_never_advise_weights_only_false(tmp_path, make_model):
    model = make_model([lora], trainable_params="none")
    good = tmp_path / "good.pt"
    write_checkpoint(lora_state(model), str(good))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(RuntimeError, match="truncated or corrupt") as error:
        read_checkpoint(str(truncated))
    assert "weights_only" not in str(error.value)

    marker = tmp_path / "ran"
    crafted = tmp_path / "crafted.pt"
    torch.save({"a": torch.zeros(1), "b": Payload(str(marker))}, str(crafted))
    with pytest.raises(RuntimeError, match="never runs code from a checkpoint") as error:
        read_checkpoint(str(crafted))
    assert "weights_only=False" not in str(error.value) and not marker.exists()


def test_crafted_averaged_hiddens_pickle_is_never_loaded(in_tmp_repo):
    expert = "datasets_concatenated/ToyX_tiny_lora"
    directory = in_tmp_repo / "exp_out" / expert / "averaged_hiddens_a2"
    directory.mkdir(parents=True)
    marker = in_tmp_repo / "ran"
    (directory / "D_TOYX_TRAIN.pickle").write_bytes(pickle.dumps(Payload(str(marker))))
    with pytest.raises(FileNotFoundError, match="old pickle format.*reinit_router_embedding.sh"):
        insert_averaged_hiddens(expert, "D/TOYX/TRAIN")
    assert not marker.exists()


def test_checkpoint_scripts_refuse_writing_over_their_input_and_escaping_exp_out(in_tmp_repo, make_model):
    model = make_model([lora], trainable_params="none")
    source = in_tmp_repo / "exp_out/stage1/best.pt"
    write_checkpoint(lora_state(model), str(source))
    before = source.read_bytes()
    with pytest.raises(ValueError, match="out_path='stage1/' is its input 'stage1'"):
        experts.put_index_to_lora(path="stage1", out_path="stage1/")
    with pytest.raises(ValueError, match=r"'\.\.' is not allowed"):
        experts.put_index_to_lora(path="stage1", out_path="../outside")
    with pytest.raises(ValueError, match=r"'\.\.' is not allowed"):
        experts.put_index_to_lora(path="x/../../etc", out_path="fine")
    assert source.read_bytes() == before and not (in_tmp_repo / "outside").exists()


def test_full_disk_is_reported_naming_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "best.pt"
    write_checkpoint({"a": torch.ones(2)}, str(path))
    before = path.read_bytes()

    def no_space(obj, f, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(OSError, match=rf"No space left on device while writing {path}") as error:
        write_checkpoint({"a": torch.zeros(2)}, str(path))
    assert error.value.errno == errno.ENOSPC
    assert path.read_bytes() == before and not list(tmp_path.glob(".tmp-*"))


# ----- configuration ------------------------------------------------------------------------------------


def test_binding_to_a_scope_nothing_uses_is_refused():
    with pytest.raises(ValueError, match=r"'P/TRIAN/Trainer.num_steps=3': nothing runs in scope 'P/TRIAN'.*P/TRAIN"):
        parse_gin(GINS, ["P/TRIAN/Trainer.num_steps=3"])
    gin.clear_config()
    parse_gin(GINS, ["P/TRAIN/Trainer.num_steps=3", "MOMA/save_weights.should_save_to_gcp=False",
                     "D/TOYSENTIMENT/EVAL/ToyDataset.num_examples=3", "M/MODEL/Model.device='cpu'"])


def test_wrong_value_type_is_named(in_tmp_repo, monkeypatch):
    monkeypatch.setenv("EXP_NAME", "typed")
    parse_gin(GINS, SMALL + ['P/TRAIN/Trainer.num_steps="ten"'])
    with pytest.raises(TypeError, match=r"P/TRAIN/Trainer.num_steps must be an integer >= 0, got 'ten'"):
        main()


def test_include_of_a_missing_gin_file_is_named(tmp_path):
    parent = tmp_path / "mine.gin"
    parent.write_text("# my settings\ninclude 'colm/experiments/no_such.gin'\n")
    with pytest.raises(FileNotFoundError, match=r"mine.gin, line 2: include 'colm/experiments/no_such.gin': no such"):
        parse_gin([str(parent)], [])


def test_weights_growing_without_bound_stop_with_the_learning_rate_named(in_tmp_repo, monkeypatch):
    monkeypatch.setenv("EXP_NAME", "diverging")
    parse_gin(GINS, SMALL + ["P/TRAIN/Trainer.num_steps=3", "P/TRAIN/get_optimizer.learning_rate=1000.0"])
    with pytest.raises(FloatingPointError, match=r"diverged at step 1.*P/TRAIN/get_optimizer.learning_rate = 1000"):
        main()
    assert (in_tmp_repo / "exp_out/diverging/best.pt").is_file()  # the step-0 best survives


def test_fp16_training_uses_a_gradient_scaler(in_tmp_repo, monkeypatch):
    monkeypatch.setenv("EXP_NAME", "half")
    parse_gin(GINS, SMALL + ["M/MODEL/Model.mix_precision='fp16'", "P/TRAIN/Trainer.num_steps=1"])
    trainer = registry.get_object("P/TRAIN")
    assert isinstance(trainer.scaler, torch.amp.GradScaler) and trainer.scaler.is_enabled()


# ----- data ---------------------------------------------------------------------------------------------


def local_dataset(path, **kwargs):
    from colm.datasets.local import LocalDataset

    return LocalDataset(name="D/MINE/TRAIN", split="train", batch_size=2, path=str(path), **kwargs)


@pytest.mark.parametrize("content, message", [
    (b'{"input": "a", "target": "b"}\n{"input": "c"}\n', r"row 1 \(line 2 .*has no 'target'"),
    (b"", r"mine.jsonl' is empty"),
    (b'{"input": "a", "target": "b"}\n{"input": "\xff\xfe", "target": "b"}\n', r"mine.jsonl', line 2: bytes that are not"),
    (b'{"input": "a", "target": "b", "label": 0}\n{"input": "a", "target": "b", "label": null}\n',
     r"row 1 .*has no 'label'"),
])
def test_bad_json_lines_are_refused_naming_file_and_row(tmp_path, content, message):
    path = tmp_path / "mine.jsonl"
    path.write_bytes(content)
    kwargs = {"label_field": "label"} if b"label" in content else {}
    with pytest.raises(ValueError, match=message):
        local_dataset(path, **kwargs)


def test_long_inputs_are_truncated_to_a_default_and_reported(tmp_path, capsys):
    from colm.models.hf_loading import hf_tokenizer

    path = tmp_path / "mine.jsonl"
    path.write_text('{"input": "' + "word " * 3000 + '", "target": "b"}\n')
    dataset = local_dataset(path)
    dataset.set_tokenizer(hf_tokenizer("colm/models/tiny/toy_t5"))
    assert dataset.max_length == 1024 and len(dataset[0]["input_ids"]) == 1024
    assert "truncated to max_length=1024" in capsys.readouterr().out


def test_zero_examples_per_dataset_is_refused(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"input": "a", "target": "b"}\n')
    with pytest.raises(ValueError, match=r"D/MINE/TRAIN/LocalDataset.max_examples_per_dataset=0"):
        local_dataset(path, max_examples_per_dataset=0)
