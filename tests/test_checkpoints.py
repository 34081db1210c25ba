"""Checkpoint surgery on synthetic tensors: key formats, the surgery modules, concatenation, CLIs."""

import inspect
import os
import subprocess
import sys

import gin
import numpy as np
import pytest
import torch

from colm.checkpoints import (
    blocks,
    decoder_router,
    experts,
    gates,
    merging,
    retrieval,
    router_from_weights,
    router_vectors,
)
from colm.checkpoints import concatenate as C
from colm.formats import keys as K
from colm.formats import layout
from colm.formats.checkpoint_io import read_checkpoint, write_checkpoint
from colm.models import architecture as A

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
R = 4
# Module -> (d_in, d_out); wo reads a wider input, like T5's d_ff.
DIMS = {
    "encoder.block.0.layer.0.SelfAttention.q": (8, 8),
    "encoder.block.0.layer.1.DenseReluDense.wo": (12, 8),
    "encoder.block.1.layer.0.SelfAttention.q": (8, 8),
    "decoder.block.0.layer.0.SelfAttention.q": (8, 8),
    "decoder.block.0.layer.1.EncDecAttention.k": (8, 8),
    "decoder.block.0.layer.1.EncDecAttention.v": (8, 8),
}
EMBED = {"encoder.embed_tokens.weight": torch.ones(10, 8), "decoder.embed_tokens.weight": torch.ones(10, 8)}


def lora_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    state = dict(EMBED)
    for m, (d_in, d_out) in DIMS.items():
        state[K.lora_key(m, "a")] = torch.randn(R, d_in, generator=g)
        state[K.lora_key(m, "b")] = torch.randn(d_out, R, generator=g)
    return state


def moe_state(n_experts=1, seed=0, gates=False, rank=R):
    """n experts with random factors and random router vectors (and gates for a one-expert checkpoint)."""
    g = torch.Generator().manual_seed(seed)
    state = dict(EMBED)
    for m, (d_in, d_out) in DIMS.items():
        for i in range(n_experts):
            state[K.layer1_key(m, i)] = torch.randn(d_in, rank, generator=g)
            state[K.layer2_key(m, i)] = torch.randn(rank, d_out, generator=g)
            state[K.router_key(m, i)] = torch.randn(d_in, generator=g)
        if gates:
            state[K.gate_key(m)] = torch.randn(d_in, generator=g)
    return state


@pytest.fixture
def exp_out(tmp_path, monkeypatch):
    root = tmp_path / "exp_out"
    monkeypatch.setattr(layout, "EXP_OUT", str(root))
    return root


def write(state, exp_out, rel):
    write_checkpoint(state, str(exp_out / rel / "best.pt"))


def read(exp_out, rel):
    return read_checkpoint(str(exp_out / rel / "best.pt"))


# ------------------------------------------------------------------------------------------------ keys


def test_key_parsing_round_trips():
    key = "encoder.block.3.layer.1.DenseReluDense.wi_0._addons.expert_lora.layer1__12"
    parsed = K.parse_indexed(key)
    assert (parsed.module, parsed.param, parsed.index) == ("encoder.block.3.layer.1.DenseReluDense.wi_0", "layer1", 12)
    assert parsed.key == key and parsed.with_index(0).key.endswith("layer1__0")
    assert K.parse_indexed("decoder._addons.router.expert_embeddings__3").module == "decoder"
    assert K.parse_indexed("x._addons.router.layer1__0") is None  # layer1 lives in expert_lora, not router
    assert K.parse_indexed("x._addons.expert_lora.expert_input_gate") is None
    assert K.is_input_gate_key("x._addons.expert_lora.expert_input_gate")
    assert A.block_of("decoder.block.2.layer.1.EncDecAttention.k") == "decoder.block.2"
    with pytest.raises(ValueError, match="missing \\[1\\]"):
        K.check_contiguous([0, 2], "test")


# ------------------------------------------------------------------------------------------------ stage 1b, gates


def test_put_index_to_lora_transposes_and_keeps_the_update():
    state = lora_state()
    out = experts.put_index_to_lora_state(state)
    x = torch.randn(5, 12, dtype=torch.float64)
    for m, (d_in, d_out) in DIMS.items():
        a, b = state[K.lora_key(m, "a")], state[K.lora_key(m, "b")]
        layer1, layer2 = out[K.layer1_key(m, 0)], out[K.layer2_key(m, 0)]
        assert layer1.shape == (d_in, R) and layer2.shape == (R, d_out)
        assert torch.equal(layer1, a.t()) and torch.equal(layer2, b.t())
        xs = x[:, :d_in].float()
        torch.testing.assert_close(xs @ layer1 @ layer2, xs @ a.t() @ b.t())
        assert torch.equal(out[K.router_key(m, 0)], torch.zeros(d_in))
    assert not any(K.parse_lora(k) for k in out)
    assert torch.equal(out["encoder.embed_tokens.weight"], EMBED["encoder.embed_tokens.weight"])
    assert len(out) == 2 + 3 * len(DIMS)
    with pytest.raises(ValueError, match="already in the MoE format"):
        experts.put_index_to_lora_state(out)
    half = dict(state)
    del half[K.lora_key("encoder.block.0.layer.0.SelfAttention.q", "b")]
    with pytest.raises(ValueError, match="expert_lora_b is missing"):
        experts.put_index_to_lora_state(half)


def test_use_input_gate_as_router_copies_the_gate(exp_out):
    state = moe_state(gates=True)
    write(state, exp_out, "datasets_concatenated/ToySummary_lora_gate")
    gates.use_input_gate_as_router("datasets_concatenated/ToySummary_lora_gate")  # in place
    out = read(exp_out, "datasets_concatenated/ToySummary_lora_gate")
    for m in DIMS:
        assert torch.equal(out[K.router_key(m, 0)], state[K.gate_key(m)])
        assert not torch.equal(out[K.router_key(m, 0)], state[K.router_key(m, 0)])
        assert torch.equal(out[K.gate_key(m)], state[K.gate_key(m)])  # the gate stays
    with pytest.raises(ValueError, match="expert_input_gate"):
        gates.use_input_gate_as_router_state(moe_state())
    two = moe_state(n_experts=2, gates=True)
    with pytest.raises(ValueError, match="one-expert"):
        gates.use_input_gate_as_router_state(two)


def test_use_input_gate_in_router_and_expert_prepends_the_gate():
    state = moe_state(gates=True)
    out = gates.use_input_gate_in_router_and_expert_state(state)
    x = torch.randn(3, 12)
    for m, (d_in, d_out) in DIMS.items():
        gate, layer1, layer2 = state[K.gate_key(m)], out[K.layer1_key(m, 0)], out[K.layer2_key(m, 0)]
        assert layer1.shape == (d_in, R + 1) and layer2.shape == (R + 1, d_out)
        assert torch.equal(layer1[:, 0], gate) and torch.equal(layer2[0], torch.zeros(d_out))
        torch.testing.assert_close(x[:, :d_in] @ layer1 @ layer2,
                                   x[:, :d_in] @ state[K.layer1_key(m, 0)] @ state[K.layer2_key(m, 0)])
        assert torch.equal(out[K.router_key(m, 0)], gate)


def test_delete_expert_input_gate_in_place(exp_out):
    write(moe_state(gates=True), exp_out, "g")
    gates.delete_expert_input_gate("g")
    out = read(exp_out, "g")
    assert not any(K.is_gate_key(k) for k in out) and len(out) == 2 + 3 * len(DIMS)


# ------------------------------------------------------------------------------------------------ concatenation

NAMES = ["ToySummary", "ToyReverse", "ToyInstrument"]  # deliberately not alphabetical


def write_experts(exp_out, names=NAMES, suffix="lora_gate"):
    states = {}
    for seed, name in enumerate(names):
        states[name] = moe_state(seed=seed + 1, gates=True)
        states[name]["encoder.embed_tokens.weight"] = torch.full((10, 8), float(seed))
        write(states[name], exp_out, layout.expert_path(name, suffix))
    return states


def test_run_concatenate_orders_experts_and_drops_gates(exp_out):
    states = write_experts(exp_out)
    C.run_concatenate(datasets=NAMES, suffix="lora_gate", out_path="ToyComplete")
    out = read(exp_out, "ToyComplete")
    for index, name in enumerate(NAMES):
        for m in DIMS:
            for make in (K.layer1_key, K.layer2_key, K.router_key):
                assert torch.equal(out[make(m, index)], states[name][make(m, 0)])
    assert K.expert_indices(out) == [0, 1, 2]
    assert not any(K.is_gate_key(k) for k in out)
    assert torch.equal(out["encoder.embed_tokens.weight"], torch.zeros(10, 8))  # from the first expert only
    assert len(out) == 2 + 3 * 3 * len(DIMS)
    K.validate_experts(out, "concatenated")


def _index_one(state):
    key = K.layer1_key("encoder.block.0.layer.0.SelfAttention.q", 0)
    state[key.replace("__0", "__1")] = state.pop(key)


def _unknown_key(state):
    state["encoder.block.0.layer.0.SelfAttention.q.weight"] = torch.zeros(8, 8)


def _missing_router(state):
    del state[K.router_key("decoder.block.0.layer.1.EncDecAttention.v", 0)]


def _router_without_expert(state):
    state[K.router_key("decoder.block.0.layer.1.DenseReluDense.wo", 0)] = torch.zeros(8)


def _other_rank(state):
    m = "encoder.block.0.layer.0.SelfAttention.q"
    state[K.layer1_key(m, 0)] = torch.zeros(8, R + 1)
    state[K.layer2_key(m, 0)] = torch.zeros(R + 1, 8)


@pytest.mark.parametrize("corrupt, message", [
    (_index_one, "expert index 1"), (_unknown_key, "unexpected key"), (_missing_router, "no router vector"),
    (_router_without_expert, "router vector but no expert"), (_other_rank, "does not match"),
])
def test_run_concatenate_refuses_bad_input_and_keeps_the_old_output(exp_out, corrupt, message):
    states = write_experts(exp_out)
    C.run_concatenate(datasets=NAMES, suffix="lora_gate", out_path="ToyComplete")
    before = (exp_out / "ToyComplete/best.pt").read_bytes()
    bad = states["ToyReverse"]
    corrupt(bad)
    write(bad, exp_out, layout.expert_path("ToyReverse", "lora_gate"))
    with pytest.raises(ValueError, match=message):
        C.run_concatenate(datasets=NAMES, suffix="lora_gate", out_path="ToyComplete")
    assert (exp_out / "ToyComplete/best.pt").read_bytes() == before
    assert sorted(p.name for p in (exp_out / "ToyComplete").iterdir()) == ["best.pt", "experts.json"]  # no temporary file


def test_run_concatenate_reports_every_missing_input(exp_out):
    write_experts(exp_out, names=["ToyReverse"])
    with pytest.raises(FileNotFoundError) as error:
        C.run_concatenate(datasets=NAMES, suffix="lora_gate", out_path="ToyComplete")
    assert "2 of 3" in str(error.value)
    assert "ToySummary_lora_gate" in str(error.value) and "ToyInstrument_lora_gate" in str(error.value)
    assert not (exp_out / "ToyComplete").exists()


def test_run_concatenate_print_commands():
    text = C.run_concatenate(arch="A1", datasets="Toy", print_commands=True, suffix="t5xl_lora", compute_hiddens=True,
                             extra_bindings='M/MODEL/ENCODER/ExposeHidden.reduction_method="masked_mean"')
    commands = text.split("; ")
    assert len(commands) == 8
    assert commands[1] == (
        "bash colm/experiments/bash_scripts/reinit_router_embedding.sh "
        "-exp_name datasets_concatenated/ToyTopic_t5xl_lora "
        "-dataset TOYTOPIC -arch A1 -compute_hiddens True -hiddens_suffix _a2 "
        "-extra_bindings 'M/MODEL/ENCODER/ExposeHidden.reduction_method=\"masked_mean\"'"
    )
    with pytest.raises(ValueError, match="True or False"):
        C.run_concatenate(datasets="Toy", print_commands=True, compute_hiddens="maybe")
    with pytest.raises(ValueError, match="datasets is empty"):
        C.run_concatenate(datasets=())


def test_concatenate_two_checkpoints_shifts_indices():
    one, two = moe_state(n_experts=2, seed=1), moe_state(n_experts=1, seed=2)
    out = experts.concatenate_two_checkpoints_state(one, two, index=2)
    m = "encoder.block.1.layer.0.SelfAttention.q"
    assert K.expert_indices(out) == [0, 1, 2]
    assert torch.equal(out[K.layer1_key(m, 2)], two[K.layer1_key(m, 0)])
    assert torch.equal(out[K.layer1_key(m, 1)], one[K.layer1_key(m, 1)])
    with pytest.raises(ValueError, match="index=2"):
        experts.concatenate_two_checkpoints_state(one, two, index=1)
    with pytest.raises(ValueError, match="without gaps"):
        experts.concatenate_two_checkpoints_state(one, two, index=3)


# ------------------------------------------------------------------------------------------------ merging


def dense_update(layer1, layer2):
    return layer1.double() @ layer2.double() / R


def test_outer_product_merge_is_the_mean_update_and_factor_average_is_not(exp_out):
    state = moe_state(n_experts=3, seed=7)
    write(state, exp_out, "ToyComplete")
    merging.average_outer_product_lora_weights("ToyComplete", "ToyMerged")
    merged = read(exp_out, "ToyMerged")
    factors = merging.average_lora_weights_state(state)
    x = torch.randn(6, 12, dtype=torch.float64)
    for m, (d_in, d_out) in DIMS.items():
        expected = x[:, :d_in] @ sum(dense_update(state[K.layer1_key(m, i)], state[K.layer2_key(m, i)])
                                     for i in range(3)) / 3
        layer1, layer2 = merged[K.layer1_key(m, 0)], merged[K.layer2_key(m, 0)]
        assert layer1.shape == (d_in, 3 * R) and layer2.shape == (3 * R, d_out)
        torch.testing.assert_close(x[:, :d_in] @ dense_update(layer1, layer2), expected)
        naive = x[:, :d_in] @ dense_update(factors[K.layer1_key(m, 0)], factors[K.layer2_key(m, 0)])
        assert not torch.allclose(naive, expected, rtol=1e-2, atol=1e-3)
        torch.testing.assert_close(factors[K.layer1_key(m, 0)], sum(state[K.layer1_key(m, i)] for i in range(3)) / 3)
        for out in (merged, factors):
            assert torch.equal(out[K.router_key(m, 0)], torch.zeros(d_in))
    for out in (merged, factors):
        assert K.expert_indices(out) == [0] and "decoder.embed_tokens.weight" in out
    with pytest.raises(ValueError, match="unexpected key"):
        merging.average_outer_product_lora_weights_state(moe_state(gates=True))


def test_normalize_expert_weights_caps_norms():
    state = moe_state(n_experts=2)
    out = experts.normalize_expert_weights_state(state, index=1, norm_value=1.0, keys_to_ignore=("wo",))
    m = "encoder.block.0.layer.0.SelfAttention.q"
    assert torch.isclose(out[K.layer1_key(m, 1)].norm(), torch.tensor(1.0))
    assert torch.equal(out[K.layer1_key(m, 0)], state[K.layer1_key(m, 0)])  # other index untouched
    wo = "encoder.block.0.layer.1.DenseReluDense.wo"
    assert torch.equal(out[K.layer1_key(wo, 1)], state[K.layer1_key(wo, 1)])  # ignored key
    with pytest.raises(ValueError, match="norm_value"):
        experts.normalize_expert_weights_state(state)


# ------------------------------------------------------------------------------------------------ router vectors


def test_arrow_router_vector_is_the_top_left_singular_vector():
    state = moe_state(n_experts=2, seed=3)
    out = router_from_weights.create_router_embeddings_from_weights_state(state, "top1_eigen_weighted_vector")
    weighted = router_from_weights.create_router_embeddings_from_weights_state(state, "eigen_weighted_vector")
    simple = router_from_weights.create_router_embeddings_from_weights_state(state, "simple")
    for m in DIMS:
        for i in range(2):
            layer1, layer2 = state[K.layer1_key(m, i)], state[K.layer2_key(m, i)]
            u, s, _ = torch.linalg.svd(dense_update(layer1, layer2))
            vector = out[K.router_key(m, i)].double()
            assert torch.isclose(vector.norm(), torch.tensor(1.0, dtype=torch.float64), atol=1e-5)
            assert torch.isclose(vector.dot(u[:, 0]).abs(), torch.tensor(1.0, dtype=torch.float64), atol=1e-5)
            assert vector[vector.abs().argmax()] > 0
            signs = torch.sign(u[u.abs().argmax(dim=0), torch.arange(u.shape[1])])
            expected = (u * signs)[:, :R] @ (s[:R] / s.sum())
            torch.testing.assert_close(weighted[K.router_key(m, i)].double(), expected, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(simple[K.router_key(m, i)], layer1.mean(dim=1))
    with pytest.raises(NotImplementedError, match="base weight"):
        router_from_weights.create_router_embeddings_from_weights_state(state, "backbone_eigen_weighted_vector")
    with pytest.raises(ValueError, match="unknown method_type"):
        router_from_weights.create_router_embeddings_from_weights_state(state, "top2")


def test_svd_orthogonalize_router_keeps_norms_and_orthogonalises(exp_out):
    state = moe_state(n_experts=3, seed=5)
    write(state, exp_out, "ToyComplete")
    router_vectors.svd_orthogonalize_router("ToyComplete", "ToyOrth")
    out = read(exp_out, "ToyOrth")
    for m in DIMS:
        before = torch.stack([state[K.router_key(m, i)] for i in range(3)]).double()
        after = torch.stack([out[K.router_key(m, i)] for i in range(3)]).double()
        torch.testing.assert_close(after.norm(dim=1), before.norm(dim=1))
        unit = after / after.norm(dim=1, keepdim=True)
        torch.testing.assert_close(unit @ unit.t(), torch.eye(3, dtype=torch.float64), atol=1e-5, rtol=0)
        assert not torch.allclose(after, before, atol=1e-3)
    too_many = moe_state(n_experts=9)
    with pytest.raises(ValueError, match="at most as many vectors"):
        router_vectors.svd_orthogonalize_router_state(too_many)


def test_create_delete_and_add_router_embeddings():
    state = moe_state(n_experts=2)
    created = router_vectors.create_router_embeddings_state(state, ["encoder_linear"])
    assert K.router_modules(created) == [m for m in DIMS if m.startswith("encoder.")]
    assert all(torch.equal(created[K.router_key(m, 1)], torch.zeros(DIMS[m][0])) for m in K.router_modules(created))
    with pytest.raises(ValueError, match="no module with experts"):
        router_vectors.create_router_embeddings_state(state, ["nothing"])
    assert K.router_modules(router_vectors.delete_router_embeddings_state(state)) == []
    summed = router_vectors.add_router_embeddings_state([state, state, state])
    key = K.router_key("decoder.block.0.layer.0.SelfAttention.q", 1)
    torch.testing.assert_close(summed[key], 3 * state[key])
    with pytest.raises(ValueError, match="other router keys"):
        router_vectors.add_router_embeddings_state([state, created])


def test_decoder_router_tools():
    state = moe_state(n_experts=2)
    one = decoder_router.make_one_router_decoder_state(state)
    k, v = "decoder.block.0.layer.1.EncDecAttention.k", "decoder.block.0.layer.1.EncDecAttention.v"
    for i in range(2):
        torch.testing.assert_close(one[K.router_key("decoder", i)],
                                   (state[K.router_key(k, i)] + state[K.router_key(v, i)]) / 2)
    assert [m for m in K.router_modules(one) if m.startswith("decoder")] == ["decoder"]
    assert K.router_key("encoder.block.0.layer.0.SelfAttention.q", 0) in one
    mixed = decoder_router.make_a_specific_checkpoint_state(moe_state(n_experts=2, seed=9), one)
    assert torch.equal(mixed[K.router_key("decoder", 1)], one[K.router_key("decoder", 1)])
    assert K.router_key(k, 0) not in mixed


def test_block_routers_and_skipping():
    state = moe_state(n_experts=2)
    merged = blocks.merge_into_blocks_state(state)
    q0, wo0 = "encoder.block.0.layer.0.SelfAttention.q", "encoder.block.0.layer.1.DenseReluDense.wo"
    torch.testing.assert_close(merged[K.router_key("encoder.block.0", 1)], state[K.router_key(q0, 1)])  # wo left out
    assert K.router_key(q0, 0) not in merged and K.router_key(wo0, 0) not in merged
    dec = [f"decoder.block.0.layer.{s}" for s in ("0.SelfAttention.q", "1.EncDecAttention.k", "1.EncDecAttention.v")]
    torch.testing.assert_close(merged[K.router_key("decoder.block.0", 0)],
                               sum(state[K.router_key(m, 0)] for m in dec) / 3)
    blockwise = blocks.make_router_blockwise_state(state, index=0)
    torch.testing.assert_close(blockwise[K.router_key(dec[1], 0)], merged[K.router_key("decoder.block.0", 0)])
    assert torch.equal(blockwise[K.router_key(dec[1], 1)], state[K.router_key(dec[1], 1)])
    skipped = blocks.skip_blocks_state(state, 0)
    assert not any(k.startswith("encoder.block.0.") for k in skipped)
    assert any(k.startswith("encoder.block.1.") for k in skipped) and "encoder.embed_tokens.weight" in skipped
    ffn = blocks.skip_alternate_state(state, True)
    assert set(K.expert_modules(ffn)) == {wo0} and "decoder.embed_tokens.weight" in ffn
    assert wo0 not in K.expert_modules(blocks.skip_alternate_state(state, False))


# ------------------------------------------------------------------------------------------------ retrieval


def test_make_checkpoint_for_retrieval_layout(exp_out):
    names = ["ToySummary", "Flanv2zsBoolq"]
    write(moe_state(n_experts=2), exp_out, "ToyComplete")
    libraries = [np.random.rand(3, 4).astype(np.float32), np.random.rand(5, 4).astype(np.float32)]
    os.makedirs(exp_out / "library")
    np.save(exp_out / "library/D_TOYSUMMARY_TRAIN_K5_embeddings.npy", libraries[0])
    with pytest.raises(FileNotFoundError) as error:
        retrieval.make_checkpoint_for_retrieval("ToyComplete", "library", "ToyRetrieval", 5, names)
    assert "D_FLANV2BOOLQ_ZS_TRAIN_K5_embeddings.npy" in str(error.value)
    assert "retriever.sh -make_expert_library True -dataset_setting Flanv2" in str(error.value)
    np.save(exp_out / "library/D_FLANV2BOOLQ_ZS_TRAIN_K5_embeddings.npy", libraries[1])
    retrieval.make_checkpoint_for_retrieval("ToyComplete", "library", "ToyRetrieval", 5, names)
    out = read(exp_out, "ToyRetrieval")
    assert K.router_modules(out) == ["encoder"]
    first, second = out[K.router_key("encoder", 0)], out[K.router_key("encoder", 1)]
    assert first.shape == second.shape == (20,)
    assert torch.equal(first.view(5, 4)[:3], torch.from_numpy(libraries[0]))
    assert torch.equal(first.view(5, 4)[3:], torch.zeros(2, 4))
    assert torch.equal(second.view(5, 4), torch.from_numpy(libraries[1]))
    assert K.expert_count(out) == 2 and "encoder.embed_tokens.weight" in out


def test_paths_are_relative_to_exp_out(exp_out):
    for bad in ("exp_out/ToyComplete", "ToyComplete/best.pt", "/abs/ToyComplete", ""):
        with pytest.raises(ValueError, match="relative to"):
            layout.checkpoint_file(bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        experts.put_index_to_lora("missing", "out")


# ------------------------------------------------------------------------------------------------ gin and CLIs


def test_gin_names_are_unambiguous():
    from colm.checkpoints import cli  # noqa: F401  (registers func_caller)

    functions = [experts.put_index_to_lora, gates.use_input_gate_as_router, merging.average_outer_product_lora_weights,
                 blocks.make_router_blockwise, blocks.skip_blocks, C.run_concatenate, C.commands_concatenate,
                 cli.func_caller]
    for fn in functions:
        first = next(iter(inspect.signature(fn).parameters))
        gin.bind_parameter(f"{fn.__name__}.{first}", None)  # raises on an ambiguous short name


SURGERY_FUNCTIONS = [
    "put_index_to_lora", "concatenate_two_checkpoints", "normalize_expert_weights", "use_input_gate_as_router",
    "use_input_gate_in_router_and_expert", "delete_expert_input_gate", "create_router_embeddings",
    "delete_router_embeddings", "add_router_embeddings", "svd_orthogonalize_router",
    "create_router_embeddings_from_weights", "make_one_router_decoder", "make_a_specific_checkpoint",
    "merge_into_blocks", "make_router_blockwise", "skip_blocks", "skip_alternate", "average_lora_weights",
    "average_outer_product_lora_weights", "make_checkpoint_for_retrieval", "run_concatenate", "commands_concatenate",
]


def test_command_line_registers_every_surgery_function():
    """In a fresh interpreter, what scripts/manipulations.py imports resolves func_caller.func=@<name> for every
    checkpoint function, under the names the README and the launchers use."""
    code = ("import gin, colm.checkpoints.cli\n"
            f"for name in {SURGERY_FUNCTIONS!r}:\n"
            "    gin.parse_config(f'func_caller.func = @{name}')\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": REPO_ROOT},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
def test_scripts_run_end_to_end(in_tmp_repo):
    env = {**os.environ, "PYTHONPATH": REPO_ROOT}
    exp_out = in_tmp_repo / "exp_out"
    for seed, name in enumerate(["ToyReverse", "ToySummary"]):
        write(lora_state(seed), exp_out, f"{name}_lora")
    commands = [
        [sys.executable, "scripts/manipulations.py", "--gin_bindings", "func_caller.func=@put_index_to_lora",
         'put_index_to_lora.path="ToyReverse_lora"',
         'put_index_to_lora.out_path="datasets_concatenated/ToyReverse_lora"'],
        [sys.executable, "scripts/concatenate.py", "--gin_bindings",
         'run_concatenate.datasets=["ToyReverse", "ToySummary"]', 'run_concatenate.suffix="lora"',
         'run_concatenate.out_path="ToyComplete"'],
    ]
    done = subprocess.run(commands[0], cwd=in_tmp_repo, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    converted = read(exp_out, "datasets_concatenated/ToyReverse_lora")
    assert K.expert_indices(converted) == [0] and len(K.expert_modules(converted)) == len(DIMS)
    write(experts.put_index_to_lora_state(lora_state(1)), exp_out, "datasets_concatenated/ToySummary_lora")
    done = subprocess.run(commands[1], cwd=in_tmp_repo, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = read(exp_out, "ToyComplete")
    m = "decoder.block.0.layer.1.EncDecAttention.v"
    assert torch.equal(out[K.layer2_key(m, 1)], lora_state(1)[K.lora_key(m, "b")].t())
    assert torch.equal(out[K.layer1_key(m, 0)], lora_state(0)[K.lora_key(m, "a")].t())
