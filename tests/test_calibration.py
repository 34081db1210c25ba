"""Calibration of router input means (centred routing): the measured means against a direct computation, the
calibrated checkpoint, and the command line end to end."""

import os
import runpy
from collections import OrderedDict

import gin
import pytest
import torch

from colm import registry
from colm.datasets.dataset import Dataset
from colm.formats.experts_file import write_experts_file
from colm.ginparse import parse_gin
from colm.moma.moe import extend_moe
from colm.procedures import calibration

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOE = ["M/MODEL/FFNExperts.topk_value=2", "M/MODEL/FFNExperts.normalize_topk=True", "M/MODEL/Model.device='cpu'"]
WATCHED = {"encoder.block.1.layer.0.SelfAttention.v": "encoder", "decoder.block.0.layer.1.EncDecAttention.k": "encoder",
           "decoder.block.1.layer.2.DenseReluDense.wi_0": "decoder", "decoder.block.0.layer.1.EncDecAttention.q": "decoder"}


class ListDataset(Dataset):
    """A dataset of given (input, target) pairs."""

    def __init__(self, name, pairs, batch_size=2):
        self.pairs = pairs
        super().__init__(name=name, split="train", batch_size=batch_size)

    def load_data(self):
        self.examples = [{"input_str": i, "target_str": t} for i, t in self.pairs]


def routed_model(n_experts=3, seed=0):
    parse_gin(["colm/models/tiny/t5.gin", "colm/models/tiny/moe_lora_rank16_a2.gin"], MOE)
    model = registry.get_object("M/MODEL")
    extend_moe(model, num_new_experts=n_experts)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for router in model.addons["router"].values():
            router.expert_embeddings.copy_(torch.randn(router.expert_embeddings.shape, generator=gen))
        for experts in model.addons["expert_lora"].values():
            experts.layer2.copy_(torch.randn(experts.layer2.shape, generator=gen) * 0.3)
    model.eval()
    return model


DATA = {"D/A/TRAIN": [("reverse the letters abcd", "dcba"), ("reverse the letters qrs", "srq"),
                      ("reverse the letters mnopq", "qponm")],
        "D/B/TRAIN": [("is this sentence long or short", "short"), ("sort these letters dcab", "abcd"),
                      ("count the vowels in banana", "three"), ("x", "a much longer target sentence here")]}


def direct_means(model, datasets):
    """The mean inputs computed without the calibration code: module inputs from forward pre-hooks, averaged
    over real input tokens (encoder side) or real target positions (decoder side), per dataset, then over
    datasets."""
    seen = {}
    handles = [model.module(name).register_forward_pre_hook(lambda m, a, name=name: seen.__setitem__(name, a[0]))
               for name in WATCHED]
    per_dataset = []
    try:
        for dataset in datasets:
            dataset.set_tokenizer(model.tokenizer)
            batch = dataset.collate([dataset[i] for i in range(len(dataset))])
            ids, targets = batch["input_ids"], batch["target_ids"]
            with torch.no_grad():
                model.torch_model(input_ids=ids, attention_mask=(ids != model.pad_id).long(),
                                  labels=targets.masked_fill(targets == model.pad_id, -100))
            means = {}
            for name, side in WATCHED.items():
                keep = (ids if side == "encoder" else targets) != model.pad_id
                means[name] = seen[name].double()[keep].mean(dim=0)
            per_dataset.append(means)
    finally:
        for handle in handles:
            handle.remove()
    return {name: sum(d[name] for d in per_dataset) / len(per_dataset) for name in WATCHED}


def test_measured_means_match_a_direct_computation():
    model = routed_model()
    datasets = [ListDataset(name, pairs) for name, pairs in DATA.items()]
    means, used = calibration.measure_router_input_means(model, datasets, num_examples=50)
    assert used == {"D/A/TRAIN": 3, "D/B/TRAIN": 4}
    assert set(means) == set(model.addons["router"])
    expected = direct_means(model, datasets)
    for name in WATCHED:
        assert means[name].shape == (model.module(name).in_features,)
        torch.testing.assert_close(means[name].double(), expected[name], rtol=1e-5, atol=1e-5)
    # Each dataset counts alike: not the token-weighted mean over both.
    only_a, _ = calibration.measure_router_input_means(model, datasets[:1], num_examples=50)
    only_b, _ = calibration.measure_router_input_means(model, datasets[1:], num_examples=50)
    name = "decoder.block.1.layer.2.DenseReluDense.wi_0"
    torch.testing.assert_close(means[name], (only_a[name] + only_b[name]) / 2)
    # Fewer examples: a subset, reproducible for a seed.
    few, used = calibration.measure_router_input_means(model, datasets[1:], num_examples=2, seed=3)
    again, _ = calibration.measure_router_input_means(model, datasets[1:], num_examples=2, seed=3)
    assert used == {"D/B/TRAIN": 2}
    assert torch.equal(few[name], again[name]) and not torch.allclose(few[name], only_b[name])


def test_measure_refuses_a_model_without_routers_and_bad_arguments(make_model):
    with pytest.raises(ValueError, match="no 'router' addons"):
        calibration.measure_router_input_means(make_model(), [ListDataset("D/A/TRAIN", DATA["D/A/TRAIN"])])
    gin.clear_config()
    registry.reset()
    model = routed_model()
    with pytest.raises(ValueError, match="num_examples must be >= 1"):
        calibration.measure_router_input_means(model, [ListDataset("D/A/TRAIN", DATA["D/A/TRAIN"])], num_examples=0)
    with pytest.raises(ValueError, match="No calibration datasets"):
        calibration.measure_router_input_means(model, [])


def test_add_input_means_state_checks_the_routers():
    state = {"m1._addons.router.expert_embeddings__0": torch.ones(4),
             "m1._addons.expert_lora.layer1__0": torch.ones(4, 2),
             "m2._addons.router.expert_embeddings__0": torch.ones(4)}
    means = {"m1": torch.arange(4.0), "m2": torch.zeros(4)}
    out = calibration.add_input_means_state(state, means)
    assert torch.equal(out["m1._addons.router.input_mean"], torch.arange(4.0))
    assert "m1._addons.router.input_mean" not in state  # the input dict is left alone
    with pytest.raises(ValueError, match="no mean for 1 routed module"):
        calibration.add_input_means_state(state, {"m1": torch.zeros(4)})
    with pytest.raises(ValueError, match="means for 1 module"):
        calibration.add_input_means_state(state, {**means, "m3": torch.zeros(4)})


def toy_train_scopes(n=2):
    """Whatever TRAIN scopes the toy registry defines (the toy world changes; nothing here depends on it)."""
    parse_gin(["colm/datasets/toy.gin"], [])
    scopes = [s for s in registry.known_scopes() if s.startswith("D/TOY") and s.endswith("/TRAIN")]
    gin.clear_config()
    registry.reset()
    assert len(scopes) >= n
    return scopes[:n]


def test_calibrate_routers_command_end_to_end(in_tmp_repo, monkeypatch, capsys):
    from conftest import write_random_moe_checkpoint

    from colm.formats.checkpoint_io import read_checkpoint
    from colm.moma.weights import load_weights

    scopes = toy_train_scopes()
    source = in_tmp_repo / "exp_out" / "moe" / "best.pt"
    source.parent.mkdir(parents=True)
    write_random_moe_checkpoint(source, n_experts=3)
    write_experts_file(str(source.parent), OrderedDict([("E0", "S0"), ("E1", "S1"), ("E2", "S2")]))
    before = source.read_bytes()
    monkeypatch.setenv("EXP_NAME", "unset")  # the command sets EXP_NAME; restored afterwards
    cli = runpy.run_path(os.path.join(REPO_ROOT, "scripts/calibrate_routers.py"))
    assert cli["main"](["--exp_name", "moe", "--out_path", "moe_centred", "--datasets", *scopes,
                        "--num_examples", "3", "--model_type", "tiny"]) == 0
    assert source.read_bytes() == before  # the input is never modified
    out_dir = in_tmp_repo / "exp_out" / "moe_centred"
    assert (out_dir / "experts.json").read_text() == (source.parent / "experts.json").read_text()
    calibrated = read_checkpoint(str(out_dir / "best.pt"))
    original = read_checkpoint(str(source))
    routers = {k.split("._addons.")[0] for k in original if ".router.expert_embeddings__" in k}
    mean_keys = {k for k in calibrated if k.endswith("._addons.router.input_mean")}
    assert mean_keys == {calibration.input_mean_key(m) for m in routers}
    assert all(torch.equal(calibrated[k], v) for k, v in original.items())
    assert all(calibrated[k].abs().sum() > 0 for k in mean_keys)
    # The calibrated checkpoint loads, and its routers hold the means.
    gin.clear_config()
    registry.reset()
    parse_gin(["colm/models/tiny/t5.gin", "colm/models/tiny/moe_lora_rank16_a2.gin"], MOE)
    model = registry.get_object("M/MODEL")
    load_weights(model, weight_path=str(out_dir / "best.pt"))
    m = "decoder.block.0.layer.0.SelfAttention.o"
    assert torch.equal(model.get_addon(m, "router").input_mean, calibrated[calibration.input_mean_key(m)])
    # Writing over the input is refused, naming the fix.
    gin.clear_config()
    registry.reset()
    assert cli["main"](["--exp_name", "moe", "--out_path", "moe", "--datasets", scopes[0], "--model_type", "tiny"]) == 1
    assert "choose another out_path" in capsys.readouterr().err
    assert source.read_bytes() == before
    assert cli["main"](["--exp_name", "moe", "--out_path", "x", "--model_type", "tiny"]) == 1
    assert "exactly one of --datasets" in capsys.readouterr().err
