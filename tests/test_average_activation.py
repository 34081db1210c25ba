"""Average Activation: averaged linear inputs (SaveAveragedHiddens), their insertion as router vectors, and the
README's launcher sequence on the tiny model."""

import os
import runpy
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import subprocess_env
from safetensors.torch import load_file, save_file

from colm import registry
from colm.checkpoints.averaged_hiddens import insert_averaged_hiddens, insert_averaged_hiddens_state
from colm.checkpoints.concatenate import reinit_router_commands
from colm.checkpoints.experts import put_index_to_lora
from colm.datasets.dataset import InterfaceInfo
from colm.datasets.settings import get_setting
from colm.formats import keys as K
from colm.formats.checkpoint_io import read_checkpoint, write_checkpoint
from colm.ginparse import parse_gin
from colm.moma.moe import extend_moe
from colm.procedures.averaged_hiddens import SaveAveragedHiddens
from colm.procedures.results import read_results

A2 = ["colm/datasets/toy.gin", "colm/models/tiny/t5.gin", "colm/models/tiny/moe_lora_rank16_a2.gin"]
NO_LOAD = ["M/MODEL/Model.device='cpu'"]  # the A2 gin builds the MoE; without eval.gin nothing is loaded
ENC = "encoder.block.1.layer.1.DenseReluDense.wo"
CROSS_K = "decoder.block.0.layer.1.EncDecAttention.k"
DEC_Q = "decoder.block.1.layer.0.SelfAttention.q"


def one_expert_model():
    """The tiny A2 model with one random expert that visibly changes the activations."""
    parse_gin(A2, NO_LOAD)
    model = registry.get_object("M/MODEL")
    extend_moe(model, num_new_experts=1)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for addon in model.addons["expert_lora"].values():
            addon.layer2.copy_(torch.randn(addon.layer2.shape, generator=generator))
            addon.layer1.mul_(30)
    return model.eval()


def generate_with_recorded_inputs(model):
    """Generates for a padded batch in which examples stop at different steps (eos made likely by moving its
    output embedding), recording every call's input of the watched linears during generation itself."""
    calls = {name: [] for name in (ENC, CROSS_K, DEC_Q)}
    handles = [model.module(n).register_forward_pre_hook(lambda m, a, n=n: calls[n].append(a[0].clone()))
               for n in calls]
    eos, lm_head = model.eos_id, model.torch_model.lm_head.weight
    for seed in range(20):
        for steps in calls.values():
            steps.clear()
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            lm_head[eos] = torch.randn(lm_head.shape[1], generator=generator) * lm_head.norm(dim=1).mean() * 1.5
            ids = torch.randint(3, 250, (8, 9), generator=generator)
            ids[0, 5:], ids[3, 7:] = 0, 0  # padding
            batch = {"input_ids": ids}
            outputs = model(batch, InterfaceInfo(interface="gen", max_gen_length=10))
        stops = [(row[1:] == eos).nonzero()[:1].flatten().tolist() for row in outputs["output_ids"]]
        if len({tuple(s) for s in stops}) >= 3 and [] in stops:  # stops at several steps, and not at all
            break
    else:
        pytest.fail("no seed gave examples that stop at different steps; adapt the test to the tiny model")
    for handle in handles:
        handle.remove()
    return batch, outputs, calls


def run_processor(model, batch, outputs, save_dir, **kwargs):
    processor = SaveAveragedHiddens(save_dir=str(save_dir), **kwargs)
    processor.batch_process(batch, outputs, model.global_hidden_dict, model)
    processor.dataset_process("D/TOY/TRAIN")
    return {name: vector.numpy() for name, vector in load_file(str(save_dir / "D_TOY_TRAIN.safetensors")).items()}


def test_averages_equal_the_means_of_the_inputs_seen_during_generation(tmp_path):
    model = one_expert_model()
    batch, outputs, calls = generate_with_recorded_inputs(model)
    real = (batch["input_ids"] != model.pad_id).float()
    steps = torch.cat(calls[DEC_Q], dim=1)  # (B, steps, d): one call per generation step
    assert len(calls[DEC_Q]) == outputs["output_ids"].shape[1] - 1

    def masked_mean(x):  # mean over real tokens, then over examples
        return ((x * real[..., None]).sum(1) / real.sum(1, keepdim=True)).mean(0)

    def all_steps_mean():  # every step up to and including the one that produced eos
        per_example = []
        for b, row in enumerate(outputs["output_ids"]):
            n = 0
            while n < steps.shape[1]:
                n += 1
                if row[n] == model.eos_id:
                    break
            per_example.append(steps[b, :n].mean(0))
        return torch.stack(per_example).mean(0)

    default = run_processor(model, batch, outputs, tmp_path / "all")
    last = run_processor(model, batch, outputs, tmp_path / "last", decoder_last_step_only=True)
    for averages in (default, last):
        assert all(v.dtype == np.float32 for v in averages.values())
        layers = model.torch_model.config.num_layers
        assert len(averages) == layers * 7 + layers * 11 + 1  # every linear, and encoder.final_layer_norm
        torch.testing.assert_close(torch.from_numpy(averages[ENC]), masked_mean(calls[ENC][0]))
        torch.testing.assert_close(torch.from_numpy(averages[CROSS_K]), masked_mean(calls[CROSS_K][0]))
    torch.testing.assert_close(torch.from_numpy(default[DEC_Q]), all_steps_mean())
    torch.testing.assert_close(torch.from_numpy(last[DEC_Q]), calls[DEC_Q][-1][:, 0].mean(0))
    assert not torch.allclose(all_steps_mean(), steps.mean(dim=(0, 1)))  # the stopped examples do matter


def test_processor_refuses_rank_classification_outputs(tmp_path):
    model = one_expert_model()
    processor = SaveAveragedHiddens(save_dir=str(tmp_path))
    with pytest.raises(ValueError, match="'gen'"):
        processor.batch_process({"input_ids": torch.ones(1, 3, dtype=torch.long)}, {"prediction": torch.zeros(1)},
                                model.global_hidden_dict, model)


# ---------------------------------------------------------------------------------------------------------
# Insertion into a checkpoint

ENC_Q, DEC_V, DEC_O = "encoder.block.0.layer.0.SelfAttention.q", "decoder.block.0.layer.0.SelfAttention.v", \
    "decoder.block.0.layer.1.EncDecAttention.o"


def one_expert_state(modules=(ENC_Q, DEC_V, DEC_O), d_in=6, routers=None):
    state = {}
    for m in modules:
        state[K.layer1_key(m, 0)] = torch.randn(d_in, 2)
        state[K.layer2_key(m, 0)] = torch.randn(2, 5)
    for m in modules if routers is None else routers:
        state[K.router_key(m, 0)] = torch.zeros(d_in)
    return state


def write_case(root, state, averages, exp_name="datasets_concatenated/ToyX_tiny_lora", suffix="_a2",
               dataset="D/TOYX/TRAIN"):
    write_checkpoint(state, str(root / "exp_out" / exp_name / "best.pt"))
    directory = root / "exp_out" / exp_name / f"averaged_hiddens{suffix}"
    directory.mkdir(parents=True, exist_ok=True)
    save_file({m: torch.as_tensor(np.asarray(v, dtype=np.float32)) for m, v in averages.items()},
              str(directory / (dataset.replace("/", "_") + ".safetensors")))
    return root / "exp_out" / exp_name / "best.pt"


def test_insert_writes_router_keys_and_refuses_mismatches(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    state = one_expert_state()
    averages = {m: np.arange(6) + i for i, m in enumerate((ENC_Q, DEC_V, DEC_O))}
    averages["encoder.final_layer_norm"] = np.ones(6)  # recorded for A1, unused by A2
    best = write_case(tmp_path, state, averages)
    insert_averaged_hiddens("datasets_concatenated/ToyX_tiny_lora", "D/TOYX/TRAIN")
    out = read_checkpoint(str(best))
    assert set(out) == set(state)
    for m in (ENC_Q, DEC_V, DEC_O):
        assert torch.equal(out[K.router_key(m, 0)], torch.as_tensor(averages[m], dtype=torch.float32))
        assert torch.equal(out[K.layer1_key(m, 0)], state[K.layer1_key(m, 0)])

    # through the command line, a second expert index of a two-expert checkpoint
    two = {**out, **{K.parse_indexed(k).with_index(1).key: v for k, v in out.items()}}
    write_case(tmp_path, two, {m: v * 2 for m, v in averages.items()})
    cli = runpy.run_path(os.path.join(os.path.dirname(__file__), "../scripts/insert_averaged_hiddens.py"))
    assert cli["main"](["--exp_name", "datasets_concatenated/ToyX_tiny_lora", "--dataset", "D/TOYX/TRAIN",
                        "--index", "1"]) == 0
    out = read_checkpoint(str(best))
    assert torch.equal(out[K.router_key(DEC_O, 1)], torch.as_tensor(averages[DEC_O] * 2, dtype=torch.float32))
    assert torch.equal(out[K.router_key(DEC_O, 0)], two[K.router_key(DEC_O, 0)])

    before = best.read_bytes()
    extra = {**averages, "decoder.block.0.layer.2.DenseReluDense.wo": np.ones(6)}
    with pytest.raises(ValueError, match=r"have averages but no expert 0.*DenseReluDense\.wo"):
        insert_averaged_hiddens_state(state, {m: torch.as_tensor(v) for m, v in extra.items()})
    missing = {m: torch.as_tensor(v) for m, v in averages.items() if m != DEC_V}
    with pytest.raises(ValueError, match=r"have expert 0 but no average.*SelfAttention\.v"):
        insert_averaged_hiddens_state(state, missing)
    wrong_size = {m: torch.ones(4) for m in averages}
    with pytest.raises(ValueError, match="different model size"):
        insert_averaged_hiddens_state(state, wrong_size)
    with pytest.raises(FileNotFoundError, match="reinit_router_embedding.sh"):
        insert_averaged_hiddens("datasets_concatenated/ToyX_tiny_lora", "D/OTHER/TRAIN")
    with pytest.raises(NotImplementedError, match="specific_task"):
        insert_averaged_hiddens("datasets_concatenated/ToyX_tiny_lora", "D/TOYX/TRAIN", component="specific_task")
    with pytest.raises(FileNotFoundError, match=r"P3C4_lora/averaged_hiddens_a2/D_C4_EVAL\.safetensors.*SaveAveragedHiddens"):
        insert_averaged_hiddens("datasets_concatenated/ToyX_tiny_lora", "D/TOYX/TRAIN", component="task")
    assert best.read_bytes() == before  # refusals write nothing


def test_components_split_the_average_along_the_c4_average(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    averages = {m: rng.normal(size=6) for m in (ENC_Q, DEC_V, DEC_O)}
    c4 = {m: rng.normal(size=6) for m in averages}
    write_case(tmp_path, {}, c4, exp_name="P3C4_lora", dataset="D/C4/EVAL")
    parts = {}
    for component in ("pretrained", "task"):
        best = write_case(tmp_path, one_expert_state(), averages)
        insert_averaged_hiddens("datasets_concatenated/ToyX_tiny_lora", "D/TOYX/TRAIN", component=component)
        parts[component] = read_checkpoint(str(best))
    for m in averages:
        pretrained, task = (parts[c][K.router_key(m, 0)].double() for c in ("pretrained", "task"))
        c = torch.as_tensor(c4[m])
        torch.testing.assert_close(pretrained + task, torch.as_tensor(averages[m]), rtol=1e-5, atol=1e-6)
        assert abs(float(task @ c)) < 1e-5  # the task part is orthogonal to the C4 average
        along = torch.as_tensor(averages[m]) @ c / (c @ c) * c
        torch.testing.assert_close(pretrained, along, rtol=1e-5, atol=1e-6)  # the projection onto the C4 average


def test_a1_fills_the_decoder_router_from_the_final_layer_norm():
    state = one_expert_state(routers=[ENC_Q])
    state[K.router_key("decoder", 0)] = torch.zeros(6)
    averages = {m: torch.full((6,), float(i)) for i, m in enumerate((ENC_Q, DEC_V, DEC_O))}
    averages["encoder.final_layer_norm"] = torch.full((6,), 7.0)
    out = insert_averaged_hiddens_state(state, averages, arch="A1")
    assert torch.equal(out[K.router_key("decoder", 0)], averages["encoder.final_layer_norm"])
    assert torch.equal(out[K.router_key(ENC_Q, 0)], averages[ENC_Q])
    assert set(out) == set(state)
    with pytest.raises(ValueError, match="use arch A1"):
        insert_averaged_hiddens_state(state, averages, arch="A2")
    with pytest.raises(ValueError, match="per-linear decoder routers"):
        insert_averaged_hiddens_state(one_expert_state(), averages, arch="A1")
    del averages["encoder.final_layer_norm"]
    with pytest.raises(ValueError, match="final_layer_norm"):
        insert_averaged_hiddens_state(state, averages, arch="A1")


# ---------------------------------------------------------------------------------------------------------
# The launcher sequence on the tiny model


def launch(cwd, command):
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=cwd, env=subprocess_env(cwd),
                          capture_output=True, text=True)
    assert done.returncode == 0, f"{command}\n--- stderr ---\n{done.stderr[-3000:]}"
    return done


@pytest.mark.slow
def test_launcher_sequence_two_toy_experts(in_tmp_repo, make_model):
    from colm.moma.lora import modify_with_lora

    lora = make_model([lambda m: modify_with_lora(m, lora_modules=".*SelfAttention|.*EncDecAttention|.*DenseReluDense",
                                                  lora_layers="q|k|v|o|w.*")])
    names = ["ToySentiment", "ToyReverse"]
    for seed, name in enumerate(names):  # random LoRA experts, in the stage-1 key layout
        generator = torch.Generator().manual_seed(seed)
        state = {k: torch.randn(v.shape, generator=generator) * 0.3
                 for k, v in lora.torch_model.state_dict().items() if "expert_lora" in k}
        write_checkpoint(state, f"exp_out/{name}_tiny_lora/best.pt")
        put_index_to_lora(path=f"{name}_tiny_lora", out_path=f"datasets_concatenated/{name}_tiny_lora")

    # The per-expert commands are the ones run_concatenate(print_commands=True, compute_hiddens=True) prints.
    commands = reinit_router_commands(get_setting(names), arch="A2", suffix="tiny_lora", compute_hiddens=True,
                                      extra_bindings="main.logging_backend=None D/ToyDataset.num_examples=40")
    launch(in_tmp_repo, commands)
    setting = '["ToySentiment", "ToyReverse"]'
    launch(in_tmp_repo, f"{sys.executable} scripts/concatenate.py --gin_bindings 'run_concatenate.datasets={setting}' "
                        "'run_concatenate.suffix=\"tiny_lora\"' 'run_concatenate.out_path=\"ToyAverageActivation\"'")
    launch(in_tmp_repo, "bash colm/experiments/bash_scripts/eval_multitask.sh -exp_name ToyAverageActivation "
                        "-extra_bindings 'main.logging_backend=None P/EVALUATE/Evaluator.datasets=[\"D/TOYSENTIMENT/EVAL\", "
                        "\"D/TOYREVERSE/EVAL\"] D/TOYSENTIMENT/EVAL/ToyDataset.num_examples=32 "
                        "D/TOYREVERSE/EVAL/ToyDataset.num_examples=32'")

    out = in_tmp_repo / "exp_out"
    concatenated = read_checkpoint(str(out / "ToyAverageActivation/best.pt"))
    for index, (name, scope) in enumerate(get_setting(names).items()):
        expert_dir = out / f"datasets_concatenated/{name}_tiny_lora"
        averages = {m: v.numpy() for m, v in
                    load_file(str(expert_dir / f"averaged_hiddens_a2/D_{scope}_TRAIN.safetensors")).items()}
        for module in (ENC, CROSS_K, DEC_Q):
            vector = concatenated[K.router_key(module, index)]
            assert torch.equal(vector, torch.from_numpy(averages[module])) and vector.abs().sum() > 0
        assert (expert_dir / "averaged_hiddens_a2/results.txt").is_file()
        assert not (expert_dir / "results.txt").exists()  # the averaging pass leaves the expert's results alone
    results = read_results(str(out / "ToyAverageActivation/results.txt"))[-1][1]
    assert set(results) >= {"D/TOYSENTIMENT/EVAL", "D/TOYREVERSE/EVAL", "average_score"}
