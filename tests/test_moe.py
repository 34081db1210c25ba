"""The routed mixture inside the model: routing math, key layout, loading, generation."""

import gin
import pytest
import torch

from colm import registry
from colm.ginparse import parse_gin
from colm.moma import routing
from colm.moma.moe import MoELink, Router, expert_count, extend_moe
from colm.moma.sizes import resolve_size

A2 = ["colm/datasets/toy.gin", "colm/models/tiny/t5.gin", "colm/models/tiny/moe_lora_rank16_a2.gin"]
# The A2 gin builds the MoE; without eval.gin nothing is loaded.
NO_LOAD = ["M/MODEL/FFNExperts.topk_value=2", "M/MODEL/FFNExperts.normalize_topk=True", "M/MODEL/Model.device='cpu'"]


def build_model(gin_files=A2, bindings=NO_LOAD, n_experts=4, seed=0):
    parse_gin(gin_files, bindings)
    model = registry.get_object("M/MODEL")
    if n_experts:
        extend_moe(model, num_new_experts=n_experts)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for addon in model.addons["router"].values():
            addon.expert_embeddings.copy_(torch.randn(addon.expert_embeddings.shape, generator=generator))
        for addon in model.addons["expert_lora"].values():
            addon.layer2.copy_(torch.randn(addon.layer2.shape, generator=generator))
            addon.layer1.mul_(30)
    model.eval()
    return model


def capture(model, names):
    """Registers hooks that record each module's input and final output (after the addons)."""
    seen = {}
    for name in names:
        module = model.module(name)
        module.register_forward_hook(lambda m, a, o, name=name: seen.__setitem__(name, (a[0], o.clone())))
    return seen


def routed_io(model, name):
    """(input, output, host, experts, router) of one routed linear on a random encoder-decoder pass."""
    seen = capture(model, [name])
    ids = torch.randint(3, 250, (3, 11))
    with torch.no_grad():
        model.torch_model(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=ids[:, :5])
    x, y = seen[name]
    host = model.module(name)
    return x, y, host, host._addons["expert_lora"], host._addons["router"]


@pytest.mark.parametrize("name", ["encoder.block.1.layer.1.DenseReluDense.wo", "decoder.block.0.layer.0.SelfAttention.q",
                                  "decoder.block.1.layer.1.EncDecAttention.k", "decoder.block.0.layer.1.EncDecAttention.v"])
def test_routed_output_equals_dense_reference(name):
    model = build_model()
    x, y, host, experts, router = routed_io(model, name)
    expected = x @ host.weight.T + routing.dense_reference(
        x, router.expert_embeddings, experts.layer1, experts.layer2, k=2, normalize_topk=True, scale=1 / 16)
    assert (y - x @ host.weight.T).abs().max() > 1e-3  # the experts do contribute
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5)


def test_top_k_larger_than_the_number_of_experts_is_clamped():
    model = build_model(bindings=NO_LOAD + ["M/MODEL/FFNExperts.topk_value=5"], n_experts=2)
    ids = torch.randint(3, 250, (2, 6))
    with torch.no_grad():
        model.torch_model(input_ids=ids, decoder_input_ids=ids[:, :3])


def test_original_key_layout_loads_creates_experts_and_routes(tmp_path):
    """A checkpoint in the original's exact layout (spec 3.6), embedding keys included, into a model with none."""
    donor = build_model(n_experts=3, seed=1)
    state = {k: v.clone() for k, v in donor.torch_model.state_dict().items() if "_addons" in k}
    state["encoder.embed_tokens.weight"] = donor.torch_model.state_dict()["encoder.embed_tokens.weight"].clone()
    state["decoder.embed_tokens.weight"] = state["encoder.embed_tokens.weight"]
    m = "encoder.block.0.layer.0.SelfAttention.q"
    assert {f"{m}._addons.expert_lora.layer1__2", f"{m}._addons.expert_lora.layer2__2",
            f"{m}._addons.router.expert_embeddings__2"} <= state.keys()
    assert state[f"{m}._addons.expert_lora.layer1__0"].shape == (128, 16)
    assert state[f"{m}._addons.router.expert_embeddings__0"].shape == (128,)
    path = tmp_path / "best.pt"
    torch.save(state, path)

    gin.clear_config()
    registry.reset()
    loaded = build_model(n_experts=0)
    from colm.moma.weights import load_weights

    load_weights(loaded, weight_path=str(path))
    assert expert_count(loaded) == 3
    ids = torch.randint(3, 250, (2, 7))
    with torch.no_grad():
        a = donor.torch_model(input_ids=ids, decoder_input_ids=ids[:, :4]).logits
        b = loaded.torch_model(input_ids=ids, decoder_input_ids=ids[:, :4]).logits
    torch.testing.assert_close(a, b)
    resaved = loaded.torch_model.state_dict()
    for key in state:
        if "_addons" in key:
            assert torch.equal(resaved[key], state[key]), key


def test_generation_matches_teacher_forced_scoring_with_routed_decoder():
    model = build_model()
    from colm.datasets.dataset import InterfaceInfo

    ids = torch.randint(3, 250, (3, 9))
    batch = {"input_ids": ids}
    with torch.no_grad():
        generated = model(batch, InterfaceInfo(interface="gen", max_gen_length=8))["output_ids"]
        logits = model.torch_model(input_ids=ids, decoder_input_ids=generated[:, :-1]).logits
    # Greedy decoding with a KV cache routes each new token once; teacher forcing routes the same tokens in
    # one pass. Same routing gives the same next-token choices.
    produced = generated[:, 1:]
    alive = torch.ones_like(produced, dtype=torch.bool)
    alive[:, 1:] = (produced[:, :-1] != model.eos_id).cumprod(dim=1).bool()  # up to and including eos
    assert torch.equal(logits.argmax(-1)[alive], produced[alive])


def test_put_index_to_lora_checkpoint_equals_the_loralinear_model(make_model):
    """Stage 1b: the 1-expert MoE checkpoint computes exactly what the LoRALinear model it came from does."""
    import functools

    from colm.checkpoints.experts import put_index_to_lora_state
    from colm.moma.lora import modify_with_lora
    from colm.moma.weights import load_state_into

    lora = functools.partial(modify_with_lora, lora_modules=".*SelfAttention|.*EncDecAttention|.*DenseReluDense",
                             lora_layers="q|k|v|o|w.*")
    source = make_model([lora])
    with torch.no_grad():
        for name, param in source.torch_model.named_parameters():
            if "expert_lora_b" in name:
                param.normal_(std=0.5)
    state = {k: v for k, v in source.torch_model.state_dict().items() if "expert_lora" in k}
    moe_state = put_index_to_lora_state(state)
    sentence = ["colm/datasets/toy.gin", "colm/models/tiny/t5.gin", "colm/models/tiny/moe_lora_rank16.gin"]
    moe = build_model(sentence, NO_LOAD[:1] + ["M/MODEL/Model.device='cpu'"], n_experts=0)
    load_state_into(moe, moe_state, "put_index_to_lora output")
    assert expert_count(moe) == 1
    source.eval()
    ids = torch.randint(3, 250, (2, 9))
    with torch.no_grad():
        expected = source.torch_model(input_ids=ids, decoder_input_ids=ids[:, :5]).logits
        got = moe.torch_model(input_ids=ids, decoder_input_ids=ids[:, :5]).logits
        base = make_model().torch_model(input_ids=ids, decoder_input_ids=ids[:, :5]).logits
    assert (expected - base).abs().max() > 1e-2  # the LoRA does change the outputs
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


# ----- centring: input means in the checkpoint ------------------------------------------------------------------

CENTRED_MODULES = ["encoder.block.1.layer.1.DenseReluDense.wo", "decoder.block.0.layer.0.SelfAttention.q",
                   "decoder.block.1.layer.1.EncDecAttention.k"]


def set_random_input_means(model, seed=3):
    generator = torch.Generator().manual_seed(seed)
    means = {}
    for name, router in model.addons["router"].items():
        means[name] = torch.randn(router.d_router, generator=generator) * 2
        router.set_input_mean(means[name])
    return means


@pytest.mark.parametrize("name", CENTRED_MODULES)
def test_centred_routed_output_equals_dense_reference(name):
    model = build_model()
    means = set_random_input_means(model)
    x, y, host, experts, router = routed_io(model, name)
    args = (x, router.expert_embeddings, experts.layer1, experts.layer2)
    expected = x @ host.weight.T + routing.dense_reference(*args, k=2, normalize_topk=True, scale=1 / 16,
                                                           input_mean=means[name])
    uncentred = x @ host.weight.T + routing.dense_reference(*args, k=2, normalize_topk=True, scale=1 / 16)
    assert (expected - uncentred).abs().max() > 1e-3  # centring changes this layer's routing
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5)


def test_router_exposes_its_scores():
    model = build_model()
    ids = torch.randint(3, 250, (2, 9))
    with torch.no_grad():
        model.torch_model(input_ids=ids, decoder_input_ids=ids[:, :4])
    shared = model.global_hidden_dict
    for name, router in model.addons["router"].items():
        scores = shared[("router_scores", "router", name)]
        torch.testing.assert_close(shared[router.write_key], torch.softmax(scores, dim=-1))
        assert scores.std(dim=-1).mean() > 1e-3


def test_checkpoint_with_input_means_round_trips_and_centres(tmp_path):
    from colm.moma.weights import load_weights

    donor = build_model(n_experts=3, seed=1)
    plain_state = {k: v.clone() for k, v in donor.torch_model.state_dict().items() if "_addons" in k}
    assert not any("input_mean" in k for k in plain_state)  # no means: the original key layout, unchanged
    means = set_random_input_means(donor)
    state = {k: v.clone() for k, v in donor.torch_model.state_dict().items() if "_addons" in k}
    m = "decoder.block.0.layer.2.DenseReluDense.wo"
    assert torch.equal(state[f"{m}._addons.router.input_mean"], means[m])
    torch.save(state, tmp_path / "centred.pt")
    torch.save(plain_state, tmp_path / "plain.pt")
    ids = torch.randint(3, 250, (2, 7))

    def logits(model):
        with torch.no_grad():
            return model.torch_model(input_ids=ids, decoder_input_ids=ids[:, :4]).logits

    expected = logits(donor)
    outputs = {}
    for file, bindings in [("centred.pt", []), ("plain.pt", []), ("centred.pt", ["M/MODEL/Router.center_inputs=False"])]:
        gin.clear_config()
        registry.reset()
        model = build_model(bindings=NO_LOAD + bindings, n_experts=0)
        load_weights(model, weight_path=str(tmp_path / file))
        outputs[(file, tuple(bindings))] = logits(model)
        if file == "centred.pt":
            router = model.get_addon(m, "router")
            assert torch.equal(router.input_mean, means[m])
            resaved = model.torch_model.state_dict()
            assert all(torch.equal(resaved[k], v) for k, v in state.items())
    torch.testing.assert_close(outputs[("centred.pt", ())], expected)
    # center_inputs=False ignores the stored means: the same outputs as the checkpoint without them.
    torch.testing.assert_close(outputs[("centred.pt", ("M/MODEL/Router.center_inputs=False",))],
                               outputs[("plain.pt", ())])
    assert (outputs[("centred.pt", ())] - outputs[("plain.pt", ())]).abs().max() > 1e-4


def test_center_inputs_true_without_means_and_bad_means():
    model = build_model(bindings=NO_LOAD + ["M/MODEL/Router.center_inputs=True"])
    ids = torch.randint(3, 250, (2, 5))
    with pytest.raises(RuntimeError, match="no .*input_mean.*calibrate_routers"):
        with torch.no_grad():
            model.torch_model(input_ids=ids, decoder_input_ids=ids[:, :2])
    gin.clear_config()
    registry.reset()
    with pytest.raises(ValueError, match="center_inputs"):
        build_model(bindings=NO_LOAD + ["M/MODEL/Router.center_inputs='yes'"])
    gin.clear_config()
    registry.reset()
    from colm.moma.weights import load_state_into

    donor_state = {k: v for k, v in build_model(n_experts=2).torch_model.state_dict().items() if "_addons" in k}
    gin.clear_config()
    registry.reset()
    model = build_model(n_experts=0)
    m = "encoder.block.0.layer.0.SelfAttention.q"
    donor_state[f"{m}._addons.router.input_mean"] = torch.zeros(5)
    with pytest.raises(ValueError, match="input_mean has shape"):
        load_state_into(model, donor_state, "bad means")


# ----- score types from the routing table, retrieval routing, expert indices, sizes ------------------------------


def test_router_takes_its_score_types_from_the_routing_table():
    for score_type in routing.SCORE_TYPES:
        router = Router({}, "encoder.block.0.layer.0.SelfAttention.q", MoELink(), ("h",), ("w",), torch.nn.Linear(8, 8),
                        None, d_router=8, score_type=score_type)
        assert (router.weights is not None) == routing.SCORE_TYPES[score_type].learned_router_weights
    with pytest.raises(ValueError, match="Router.score_type='euclid'; choose one of .*'original'"):
        Router({}, "encoder", MoELink(), ("h",), ("w",), torch.nn.Linear(8, 8), None, d_router=8, score_type="euclid")


@pytest.mark.parametrize("score_type", ["weighted_cosine", "dot"])
def test_other_score_types_in_the_model_equal_the_dense_reference(score_type, tmp_path):
    model = build_model(bindings=NO_LOAD + [f'M/MODEL/Router.score_type="{score_type}"',
                                            "M/MODEL/Router.scaling_scores='true'"])
    generator = torch.Generator().manual_seed(5)
    for router in model.addons["router"].values():
        if router.weights is not None:
            with torch.no_grad():
                router.weights.copy_(torch.rand(router.weights.shape, generator=generator) + 0.5)
    name = "decoder.block.0.layer.0.SelfAttention.q"
    x, y, host, experts, router = routed_io(model, name)
    expected = x @ host.weight.T + routing.dense_reference(
        x, router.expert_embeddings, experts.layer1, experts.layer2, k=2, normalize_topk=True, scale=1 / 16,
        score_type=score_type, router_weights=router.weights)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5)
    # The cached prepared vectors ("dot" prepares g itself) never join the checkpoint.
    state = model.torch_model.state_dict()
    assert not any("_prepared" in key for key in state)
    assert (f"{name}._addons.router.weights" in state) == (score_type == "weighted_cosine")


def retrieval_router(d_router=8, embedding_dim=4):
    link = MoELink()
    shared = {("h",): None}
    router = Router(shared, "encoder", link, ("h",), ("w",), torch.nn.Linear(4, 4), None, d_router=d_router,
                    is_retriever="True", retrieval_embedding_dim=embedding_dim)
    return router, shared


def test_retrieval_router_routes_each_example_to_the_library_with_its_nearest_row():
    router, shared = retrieval_router()
    # Three experts with libraries of three rows of width 4 (the checkpoint's width, 12, replaces d_router = 8).
    libraries = torch.zeros(3, 3, 4)
    libraries[0, 0] = torch.tensor([1.0, 0, 0, 0])
    libraries[1, :2] = torch.tensor([[0, 1.0, 0, 0], [0, 0, 0, 2.0]])
    libraries[2, 0] = torch.tensor([0, 0, 3.0, 0])
    state = {f"encoder._addons.router.expert_embeddings__{i}": libraries[i].flatten() for i in range(3)}
    router.prepare_load("encoder._addons.router.", state)
    router.load_state_dict({k.rsplit(".", 1)[1]: v for k, v in state.items()})
    assert router.d_router == 12 and len(router.link) == 3
    shared[("h",)] = torch.tensor([[0.1, 0, 0.2, 0], [0, 0, 0.1, 1.0], [2.0, 0.1, 0, 0]])
    router.pre_forward((), {})
    assert torch.equal(shared[("w",)], torch.eye(3)[[2, 1, 0]])
    assert ("router_scores", "w") not in shared  # one-hot weights, no scores
    with pytest.raises(ValueError, match="retrieval router does not centre"):
        router.prepare_load("encoder._addons.router.", {**state, "encoder._addons.router.input_mean": torch.zeros(12)})


def test_expert_indices_come_from_the_key_spelling():
    model = build_model(n_experts=2)
    with pytest.raises(ValueError, match="identifier_stem"):
        extend_moe(model, num_new_experts=1, identifier_stem="extra")
    state = {k: v for k, v in model.torch_model.state_dict().items() if "_addons" in k}
    m = "encoder.block.0.layer.0.SelfAttention.q"
    assert f"{m}._addons.expert_lora.layer1__1" in state and f"{m}._addons.router.expert_embeddings__1" in state
    gapped = {k.replace("__1", "__2"): v for k, v in state.items()}
    gin.clear_config()
    registry.reset()
    from colm.moma.weights import load_state_into

    with pytest.raises(ValueError, match="without gaps"):
        load_state_into(build_model(n_experts=0), gapped, "gapped")


def test_resolve_size():
    host = torch.nn.Linear(6, 5)
    config = type("Config", (), {"d_model": 7})()
    assert [resolve_size(v, host, config) for v in ("host_module.in_features", "host_module.out_features",
                                                    "model.d_model", 9)] == [6, 5, 7, 9]
    for bad in ("host_module.d_model", "d_model", "modle.d_model"):
        with pytest.raises(ValueError, match="Cannot resolve size"):
            resolve_size(bad, host, config)
