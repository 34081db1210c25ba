"""colm/moma/ocean.py (top-k routing through a cluster index) against exhaustive scoring, and the Router option
Router.sublinear_scoring in the tiny model."""

import math

import gin
import pytest
import torch

from colm import registry
from colm.ginparse import parse_gin
from colm.moma import ocean, routing
from colm.moma.moe import MoELink, Router, extend_moe

# Scores of different GEMMs (exhaustive vs per cluster) agree to float rounding; within this they are ties.
TIE = 1e-4


def vectors_and_tokens(world, n_experts, d, n_tokens, seed=0):
    """Router vectors g (N, d) and tokens x (T, d): "random"; "clustered" (vectors around a few centres, random
    tokens); "tasks" (tight clusters, each token near one expert's vector: pruning happens)."""
    gen = torch.Generator().manual_seed(seed)
    if world == "random":
        return torch.randn(n_experts, d, generator=gen), torch.randn(n_tokens, d, generator=gen)
    spread = 0.5 if world == "clustered" else 0.15
    centres = torch.randn(max(1, round(math.sqrt(n_experts))), d, generator=gen)
    g = centres[torch.randint(0, centres.shape[0], (n_experts,), generator=gen)]
    g = g + spread * torch.randn(n_experts, d, generator=gen)
    x = torch.randn(n_tokens, d, generator=gen)
    if world == "tasks":
        x = 0.2 * x + g[torch.randint(0, n_experts, (n_tokens,), generator=gen)]
    return g, x


@pytest.fixture(params=["pruning", "defaults"])
def pruning(request, monkeypatch):
    """"pruning" forces the index path on every block (no fallback to exhaustive scoring for small blocks or
    blocks where most clusters survive), so small tests exercise the bound; "defaults" keeps the module's rules."""
    if request.param == "pruning":
        monkeypatch.setattr(ocean, "MIN_TOKENS_PER_CLUSTER", 0)
        monkeypatch.setattr(ocean, "EXHAUSTIVE_ABOVE", 1.0)
    return request.param


def assert_same_topk(found, scores, k):
    """found (SearchResult or (values, indices)) holds a top-k of the exhaustive scores (T, N): its experts'
    scores are the k best (ties within TIE may swap experts), and its values are those experts' scores."""
    values, indices = (found.values, found.indices) if hasattr(found, "indices") else found
    k = min(k, scores.shape[1])
    assert indices.shape == (scores.shape[0], k)
    best = torch.topk(scores, k, dim=1).values
    chosen = scores.gather(1, indices)
    scale = scores.abs().max().clamp(min=1.0)
    torch.testing.assert_close(chosen.sort(dim=1).values, best.sort(dim=1).values, atol=TIE * scale, rtol=0)
    torch.testing.assert_close(values, chosen, atol=TIE * scale, rtol=0)
    assert (indices.sort(dim=1).values.diff(dim=1) > 0).all()  # k different experts
    # Where the k-th best is clear of the next, the experts are exactly the exhaustive ones.
    if k < scores.shape[1]:
        top = torch.topk(scores, k + 1, dim=1)
        clear = top.values[:, k - 1] - top.values[:, k] > TIE * scale
        assert torch.equal(indices[clear].sort(dim=1).values, top.indices[clear, :k].sort(dim=1).values)


# ----- the index -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_experts, n_clusters", [(1, None), (5, None), (5, 50), (40, 1), (300, None), (300, 17)])
def test_index_partitions_the_experts_and_bounds_them(n_experts, n_clusters):
    g, _ = vectors_and_tokens("clustered", n_experts, 16, 1)
    prepared = routing.prepare_router_vectors(g)
    index = ocean.build_index(prepared, n_clusters)
    assert 1 <= index.n_clusters <= n_experts
    assert torch.equal(torch.cat(index.members).sort().values, torch.arange(n_experts))
    for members, vectors, centroid, radius in zip(index.members, index.member_vectors, index.centroids, index.radii):
        assert torch.equal(vectors, prepared[members])
        assert (torch.linalg.vector_norm(vectors.double() - centroid.double(), dim=1) <= radius.double()).all()
    again = ocean.build_index(prepared, n_clusters)  # seeded: the same clusters every time
    assert all(torch.equal(a, b) for a, b in zip(index.members, again.members))


def test_default_cluster_count():
    assert [ocean.default_clusters(n) for n in (1, 2, 166, 1024, 4096)] == [1, 2, 26, 64, 128]
    with pytest.raises(ValueError, match="shape"):
        ocean.build_index(torch.zeros(0, 4))


# ----- exact search against exhaustive scoring -------------------------------------------------------------------


@pytest.mark.parametrize("world", ["random", "clustered", "tasks"])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("n_experts, n_clusters", [(1, None), (2, None), (7, 100), (60, None), (257, 9)])
def test_exact_search_finds_the_exhaustive_top_k(world, k, n_experts, n_clusters, pruning):
    g, x = vectors_and_tokens(world, n_experts, 24, 300, seed=k)
    prepared = routing.prepare_router_vectors(g)
    index = ocean.build_index(prepared, n_clusters)
    _, y = ocean.search_tokens(x)
    found = ocean.search(index, y, k)
    assert_same_topk(found, y @ prepared.T, k)


def test_exact_search_prunes_where_tokens_align_with_tight_clusters(pruning):
    g, x = vectors_and_tokens("tasks", 400, 32, 512)
    index = ocean.build_index(routing.prepare_router_vectors(g))
    _, y = ocean.search_tokens(x)
    found = ocean.search(index, y, 2)
    assert found.pairs_scored < 0.5 * y.shape[0] * index.n_experts  # a count of dot products, not a timing
    assert_same_topk(found, y @ index.vectors.T, 2)


def test_random_vectors_fall_back_to_scoring_everything():
    g, x = vectors_and_tokens("random", 400, 64, 512)
    index = ocean.build_index(routing.prepare_router_vectors(g))
    _, y = ocean.search_tokens(x)
    for mode in ocean.MODES:
        found = ocean.search(index, y, 2, mode)
        assert found.pairs_scored == y.shape[0] * index.n_experts
        assert_same_topk(found, y @ index.vectors.T, 2)


def test_ties_duplicate_experts(pruning):
    """Every router vector three times: every score is a three-way tie; any of the tied experts is a top-k."""
    g, x = vectors_and_tokens("tasks", 30, 16, 200)
    g = g.repeat(3, 1)[torch.randperm(90, generator=torch.Generator().manual_seed(1))]
    prepared = routing.prepare_router_vectors(g)
    index = ocean.build_index(prepared, 12)
    _, y = ocean.search_tokens(x)
    for k in (1, 2, 4):
        assert_same_topk(ocean.search(index, y, k), y @ prepared.T, k)


def test_no_tokens(pruning):
    index = ocean.build_index(torch.randn(10, 8))
    found = ocean.search(index, torch.zeros(0, 8), 2)
    assert found.values.shape == (0, 2) and found.indices.shape == (0, 2)
    indices, weights = ocean.topk_routing(index, torch.zeros(3, 0, 8), 2)
    assert indices.shape == (3, 0, 2) and weights.shape == (3, 0, 2)


# ----- routing: experts and weights as the Router computes them -----------------------------------------------------


def reference_routing(x, g, k, score_type="original", input_mean=None, scaling_scores=True):
    """What the Router and FFNExperts compute by default (routing.router_scores, softmax, topk_weights):
    (prepared vectors, scores, probs, indices, weights, the same weights without topk_weights' eps)."""
    prepared = routing.prepare_router_vectors(g, score_type)
    scores = routing.router_scores(x, prepared, score_type, scaling_scores, input_mean=input_mean)
    probs = routing.probs_from_scores(scores)
    indices, weights = routing.topk_weights(probs, k, normalize_topk=True)
    kept = probs.gather(-1, indices)
    return prepared, scores, probs, indices, weights, kept / kept.sum(dim=-1, keepdim=True)


def assert_same_routing(ours, reference):
    """Same experts (up to ties) and weights: equal to the eps-free renormalisation, and within topk_weights' eps
    (relative eps / Q, Q the kept softmax mass, see colm/moma/ocean.py) of the routing path's weights."""
    indices, weights = ours
    _, scores, probs, ref_indices, ref_weights, ref_exact = reference
    k, n = indices.shape[-1], scores.shape[-1]
    flat_indices, flat_scores = indices.reshape(-1, k), scores.reshape(-1, n)
    assert_same_topk((flat_scores.gather(1, flat_indices), flat_indices), flat_scores, k)
    torch.testing.assert_close(weights.sort(dim=-1).values, ref_exact.sort(dim=-1).values, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(weights.sum(dim=-1), torch.ones(weights.shape[:-1]))
    # Expert by expert (slot order is free) where the experts are the same ones (all tokens but exact ties).
    same = (indices.sort(dim=-1).values == ref_indices.sort(dim=-1).values).all(dim=-1)
    ours_dense = torch.zeros_like(probs).scatter(-1, indices, weights)[same]
    exact_dense = torch.zeros_like(probs).scatter(-1, ref_indices, ref_exact)[same]
    routed_dense = torch.zeros_like(probs).scatter(-1, ref_indices, ref_weights)[same]
    torch.testing.assert_close(ours_dense, exact_dense, rtol=1e-5, atol=1e-6)
    kept_mass = probs.gather(-1, ref_indices).sum(dim=-1, keepdim=True)[same]
    assert ((ours_dense - routed_dense).abs() <= ours_dense * 1e-6 / kept_mass * 1.01 + 1e-6).all()


@pytest.mark.parametrize("world", ["random", "tasks"])
@pytest.mark.parametrize("k", [1, 2])
def test_topk_routing_equals_the_router_path(world, k, pruning):
    g, x = vectors_and_tokens(world, 120, 32, 6 * 50)
    x = x.view(6, 50, 32) * 3 + 1  # batch x length, offset and scaled like real activations
    reference = reference_routing(x, g, k)
    index = ocean.build_index(reference[0])
    assert_same_routing(ocean.topk_routing(index, x, k), reference)


def test_padding_tokens(pruning):
    """Zero and constant rows (padding positions) score every expert the same: weights 1/k on k experts."""
    g, x = vectors_and_tokens("tasks", 80, 32, 4 * 40)
    x = x.view(4, 40, 32).clone()
    x[0, 30:] = 0.0
    x[2, 35:] = 2.5
    reference = reference_routing(x, g, 2)
    index = ocean.build_index(reference[0])
    indices, weights = ocean.topk_routing(index, x, 2)
    assert_same_routing((indices, weights), reference)
    torch.testing.assert_close(weights[0, 30:], torch.full((10, 2), 0.5))


@pytest.mark.parametrize("score_type", ["original", "dot", "cosine"])
def test_centring_and_other_score_types(score_type, pruning):
    g, x = vectors_and_tokens("tasks", 100, 32, 240)
    mean = torch.randn(32, generator=torch.Generator().manual_seed(4))
    x = x + mean  # tokens that share a direction, which centring removes
    for input_mean in (None, mean):
        reference = reference_routing(x, g, 2, score_type, input_mean, scaling_scores=score_type != "dot")
        index = ocean.build_index(reference[0])
        ours = ocean.topk_routing(index, x, 2, score_type, score_type != "dot", input_mean)
        assert_same_routing(ours, reference)


def test_unsupported_score_types_are_refused():
    index = ocean.build_index(torch.randn(10, 8))
    for score_type in ("arrow", "weighted_cosine"):
        with pytest.raises(ValueError, match="sublinear scoring needs a score type"):
            ocean.topk_routing(index, torch.randn(4, 8), 2, score_type)
    with pytest.raises(ValueError, match="mode must be one of"):
        ocean.search(index, torch.randn(4, 8), 2, mode="fast")


def test_approximate_mode_agrees_on_clustered_vectors():
    """Top-k agreement of the approximate mode with exhaustive scoring on at least 99% of the tokens, and
    with a very loose bound it is exact."""
    for world in ("clustered", "tasks"):
        g, x = vectors_and_tokens(world, 600, 64, 1024)
        prepared = routing.prepare_router_vectors(g)
        index = ocean.build_index(prepared)
        _, y = ocean.search_tokens(x)
        exhaustive = torch.topk(y @ prepared.T, 2, dim=1).indices.sort(dim=1).values
        found = ocean.search(index, y, 2, "approximate")
        agreement = (found.indices.sort(dim=1).values == exhaustive).all(dim=1).float().mean()
        assert agreement >= 0.99, (world, agreement)
        assert_same_topk(ocean.search(index, y, 2, "approximate", sigmas=1e9), y @ prepared.T, 2)


# ----- the Router option in the tiny model ------------------------------------------------------------------------

A2 = ["colm/datasets/toy.gin", "colm/models/tiny/t5.gin", "colm/models/tiny/moe_lora_rank16_a2.gin"]
TOPK = ["M/MODEL/FFNExperts.topk_value=2", "M/MODEL/FFNExperts.normalize_topk=True", "M/MODEL/Model.device='cpu'"]


def build_model(bindings=(), n_experts=64, seed=0, topk=TOPK):
    """The tiny T5 with n_experts experts at every linear: router vectors around a few centres (experts of
    related tasks), random LoRA experts that change the outputs."""
    gin.clear_config()
    registry.reset()
    torch.manual_seed(seed)  # extend_moe draws the new experts' layer1 from the global generator
    parse_gin(A2, list(topk) + list(bindings))
    model = registry.get_object("M/MODEL")
    extend_moe(model, num_new_experts=n_experts)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for router in model.addons["router"].values():
            centres = torch.randn(8, router.d_router, generator=generator)
            owner = torch.randint(0, 8, (n_experts,), generator=generator)
            noise = torch.randn(n_experts, router.d_router, generator=generator)
            router.expert_embeddings.copy_(centres[owner] + 0.3 * noise)
        for experts in model.addons["expert_lora"].values():
            experts.layer2.copy_(torch.randn(experts.layer2.shape, generator=generator) * 0.3)
            experts.layer1.mul_(30)
    model.eval()
    return model


def run(model, ids):
    from colm.datasets.dataset import InterfaceInfo

    with torch.no_grad():
        logits = model.torch_model(input_ids=ids, attention_mask=(ids != 0).long(), decoder_input_ids=ids[:, :6]).logits
        generated = model({"input_ids": ids}, InterfaceInfo(interface="gen", max_gen_length=6))["output_ids"]
    return logits, generated


def test_the_test_experts_change_the_outputs():
    ids = torch.randint(3, 250, (2, 12), generator=torch.Generator().manual_seed(2))
    model = build_model()
    routed = run(model, ids)
    with torch.no_grad():
        for experts in model.addons["expert_lora"].values():
            experts.layer2.zero_()
    plain = run(model, ids)
    assert (routed[0] - plain[0]).abs().max() > 1.0 and not torch.equal(routed[1], plain[1])


@pytest.mark.slow
@pytest.mark.parametrize("centred", [False, True])
@pytest.mark.parametrize("epsilon", [None, 0.0])
def test_router_option_gives_the_default_outputs(centred, epsilon, pruning):
    """The same logits and generations. With FFNExperts.epsilon=0 the routing weights are the same up to rounding;
    with the default eps the default path's weights differ by a relative eps / Q (colm/moma/ocean.py).
    "pruning": every block goes through the index; "defaults": these blocks are too small for it (ocean.searches)
    and are scored as by default."""
    ids = torch.randint(3, 250, (4, 30), generator=torch.Generator().manual_seed(2))
    ids[1, 20:] = 0  # padding
    outputs = {}
    for option in (None, "exact"):
        bindings = [f"M/MODEL/Router.sublinear_scoring={option!r}"]
        model = build_model(bindings + ([] if epsilon is None else [f"M/MODEL/FFNExperts.epsilon={epsilon}"]))
        if centred:
            generator = torch.Generator().manual_seed(3)
            for router in model.addons["router"].values():
                router.set_input_mean(torch.randn(router.d_router, generator=generator))
        outputs[option] = run(model, ids)
        if option == "exact":  # the last call generated: the encoder's block of 4 x 30 tokens, then steps of 4
            shared = model.global_hidden_dict
            for name, router in model.addons["router"].items():
                assert router.sublinear == "exact" and router.ocean_index().n_experts == 64
                searched = ocean.searches(router.ocean_index(), 4 if router.concatenate else ids.numel())
                assert searched == (pruning == "pruning" or not router.concatenate)
                assert (("router_scores", "router", name) in shared) != searched  # only the top k are scored
                assert (router.topk_key in shared) == searched
                probs = shared[router.write_key]
                if searched:  # the renormalised top-2 weights, zero elsewhere
                    assert ((probs > 0).sum(dim=-1) == 2).all()
                    torch.testing.assert_close(probs.sum(dim=-1), torch.ones(probs.shape[:-1]))
    tolerance = 1e-3 if epsilon is None else 1e-4
    torch.testing.assert_close(outputs["exact"][0], outputs[None][0], rtol=tolerance, atol=tolerance)
    assert torch.equal(outputs["exact"][1], outputs[None][1])


def test_router_option_approximate_runs_in_the_model():
    ids = torch.randint(3, 250, (2, 12), generator=torch.Generator().manual_seed(2))
    default = run(build_model(), ids)
    approximate = run(build_model(["M/MODEL/Router.sublinear_scoring='approximate'",
                                   "M/MODEL/Router.sublinear_sigmas=1e9", "M/MODEL/Router.sublinear_clusters=4"]), ids)
    torch.testing.assert_close(approximate[0], default[0], rtol=1e-4, atol=1e-4)


def router(**kwargs):
    return Router({}, "encoder.block.0.layer.0.SelfAttention.q", MoELink(), ("h",), ("w", "router", "q"),
                  torch.nn.Linear(8, 8), None, d_router=8, **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(sublinear_scoring="fast"), r"Router.sublinear_scoring='fast'; choose None, 'exact' or 'approximate'"),
    (dict(sublinear_scoring="exact", score_type="arrow"), r"Router.score_type='arrow': sublinear scoring needs"),
    (dict(sublinear_scoring="exact", score_type="weighted_cosine"), r"Router.score_type='weighted_cosine'"),
    (dict(sublinear_scoring="exact", router_type="top1"), r"Router.router_type='smear'"),
    (dict(sublinear_scoring="exact", is_retriever=True), r"Router.is_retriever=True"),
    (dict(sublinear_scoring="exact", sublinear_clusters=0), r"Router.sublinear_clusters=0"),
    (dict(sublinear_scoring="exact", sublinear_clusters="many"), r"Router.sublinear_clusters='many'"),
    (dict(sublinear_scoring="approximate", sublinear_sigmas=0), r"Router.sublinear_sigmas=0"),
])
def test_bad_option_values_name_the_binding(kwargs, message):
    with pytest.raises(ValueError, match=message):
        router(**kwargs)
    router(sublinear_scoring=None, sublinear_clusters=0)  # ignored when off
    router(sublinear_scoring="None")


@pytest.mark.parametrize("topk, message", [
    (["M/MODEL/FFNExperts.topk_value=None"], r"FFNExperts.topk_value=<k> and FFNExperts.normalize_topk=True"),
    (["M/MODEL/FFNExperts.topk_value=2", "M/MODEL/FFNExperts.normalize_topk=False"], r"\(2, False\)"),
])
def test_experts_without_renormalised_top_k_are_refused(topk, message):
    model = build_model(["M/MODEL/Router.sublinear_scoring='exact'", "M/MODEL/Model.device='cpu'"], n_experts=4,
                        topk=topk)
    ids = torch.randint(3, 250, (2, 5))
    with pytest.raises(ValueError, match=message), torch.no_grad():
        model.torch_model(input_ids=ids, decoder_input_ids=ids[:, :2])


def test_sublinear_scoring_is_inference_only():
    model = build_model(["M/MODEL/Router.sublinear_scoring='exact'"], n_experts=4)
    ids = torch.randint(3, 250, (2, 5))
    with pytest.raises(RuntimeError, match="sublinear_scoring is for inference"):
        model.torch_model(input_ids=ids, decoder_input_ids=ids[:, :2])


def test_index_is_rebuilt_when_the_router_vectors_change():
    model = build_model(["M/MODEL/Router.sublinear_scoring='exact'"], n_experts=6)
    addon = next(iter(model.addons["router"].values()))
    index = addon.ocean_index()
    assert addon.ocean_index() is index
    with torch.no_grad():
        addon.expert_embeddings.mul_(2.0).add_(1.0)
    rebuilt = addon.ocean_index()
    assert rebuilt is not index
    torch.testing.assert_close(rebuilt.vectors, routing.prepare_router_vectors(addon.expert_embeddings.detach()))
