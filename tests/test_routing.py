"""colm.moma.routing against explicit formulas and the dense (every expert, every token) reference."""

import math

import pytest
import torch
import torch.nn.functional as F

from colm.moma import routing

D_IN, D_OUT, RANK = 24, 20, 4


def make_inputs(n_experts, lead=(3, 5), d_in=D_IN, d_out=D_OUT, rank=RANK, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, d_in, generator=gen).to(dtype)
    g = torch.randn(n_experts, d_in, generator=gen).to(dtype)
    layer1 = torch.randn(n_experts, d_in, rank, generator=gen).to(dtype)
    layer2 = torch.randn(n_experts, rank, d_out, generator=gen).to(dtype)
    return x, g, layer1, layer2


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def as_leaves(tensors, grad_mode):
    """grad_mode: fresh leaves requiring grad (routed_lora's autograd path); else the tensors (its in-place path)."""
    return [t.clone().requires_grad_() if grad_mode else t for t in tensors]


@pytest.fixture(params=["grouped", "grouped-loop", "padded", "gathered", "dense"])
def lora_path(request, monkeypatch):
    """Forces routed_lora's implementation: grouped (only the chosen pairs, unpadded: one matrix product per expert;
    "grouped-loop" with the per-expert loop that stands in for F.grouped_mm where it does not take the operands),
    padded (only the chosen pairs, in place padded to a common capacity, as with more than one thread; the autograd
    path stays unpadded), gathered (in place, each pair's own factors gathered, as for a generation step) or dense
    (every expert)."""
    monkeypatch.setattr(routing, "DENSE_MAX_EXPERTS_PER_K", 10**6 if request.param == "dense" else 0)
    if request.param == "grouped-loop":
        monkeypatch.setattr(routing, "GROUPED_MM_DTYPES", ())
    if request.param.startswith("grouped"):  # on one thread, never the padded layout
        monkeypatch.setattr(routing, "ONE_THREAD_PADDING_ROWS", -10**9)
    monkeypatch.setattr(routing, "GATHERED_WEIGHTS_MAX_PAIRS_PER_EXPERT", 10**9 if request.param == "gathered" else 0)
    threads = 2 if request.param == "padded" else 1
    monkeypatch.setattr(routing.torch, "get_num_threads", lambda: threads)
    return request.param


def routed(x, g, layer1, layer2, k, normalize, score_type="original", **kwargs):
    prepared = routing.prepare_router_vectors(g, score_type)
    delta, _ = routing.route_and_apply(x, prepared, layer1, layer2, k, normalize, 1.0 / RANK,
                                       score_type=score_type, **kwargs)
    return delta


@pytest.mark.parametrize("n_experts", [1, 2, 7])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("grad_mode", [True, False])
def test_routed_matches_dense_reference(n_experts, k, normalize, grad_mode, lora_path):
    x, g, layer1, layer2 = as_leaves(make_inputs(n_experts, seed=n_experts * 10 + k), grad_mode)
    with torch.no_grad():
        expected = routing.dense_reference(x, g, layer1, layer2, k, normalize, 1.0 / RANK)
    got = routed(x, g, layer1, layer2, k, normalize)
    assert got.requires_grad == grad_mode
    assert got.shape == (3, 5, D_OUT)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("score_type", ["dot", "cosine", "arrow"])
@pytest.mark.parametrize("router_type", ["smear", "top1"])
def test_routed_matches_dense_reference_other_routers(score_type, router_type, lora_path):
    x, g, layer1, layer2 = make_inputs(5, seed=3)
    kwargs = dict(score_type=score_type, router_type=router_type, scaling_scores=False, temperature=3.0)
    expected = routing.dense_reference(x, g, layer1, layer2, 2, True, 1.0 / RANK, **kwargs)
    torch.testing.assert_close(routed(x, g, layer1, layer2, 2, True, **kwargs), expected, atol=1e-5, rtol=1e-5)


def test_standardize_is_affine_free_layer_norm():
    v = torch.randn(6, 33) * 3 + 2
    torch.testing.assert_close(routing.standardize(v), F.layer_norm(v, (33,), eps=1e-5))


def test_original_probs_match_layer_norm_formula():
    # Offset and scaled activations: the moment-based per-token std must still match LayerNorm.
    x = torch.randn(4, 7, D_IN) * 5 + 3
    g = torch.randn(9, D_IN) * 2 - 1
    z, g_hat = F.layer_norm(x, (D_IN,), eps=1e-5), F.layer_norm(g, (D_IN,), eps=1e-5)
    expected = torch.softmax(z @ g_hat.T / math.sqrt(D_IN), dim=-1)
    got = routing.router_probs(x, routing.prepare_router_vectors(g, "original"), "original")
    assert got.shape == (4, 7, 9)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    unscaled = routing.router_probs(x, routing.prepare_router_vectors(g), scaling_scores=False)
    torch.testing.assert_close(unscaled, torch.softmax(z @ g_hat.T, dim=-1), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("scaling", [True, False])
def test_other_score_types_match_formulas(scaling):
    x = torch.randn(11, D_IN)
    g = torch.randn(6, D_IN)
    x[0] = 0.0  # cosine eps: a zero token or router vector must give zero scores, not NaN
    g[1] = 0.0
    factor = math.sqrt(1.0 / D_IN) if scaling else 1.0
    cos = (x / x.norm(dim=-1, keepdim=True).clamp(min=1e-6)) @ (g / g.norm(dim=-1, keepdim=True).clamp(min=1e-6)).T
    expected = {"dot": x @ g.T, "cosine": cos, "arrow": torch.abs(x @ g.T / 7.0)}
    for score_type, scores in expected.items():
        prepared = routing.prepare_router_vectors(g, score_type)
        got = routing.router_probs(x, prepared, score_type, scaling_scores=scaling, temperature=7.0)
        torch.testing.assert_close(got, torch.softmax(scores * factor, dim=-1), atol=1e-6, rtol=1e-5)
    # The default arrow temperature is 10.
    got = routing.router_probs(x, g, "arrow", scaling_scores=scaling)
    torch.testing.assert_close(got, torch.softmax(torch.abs(x @ g.T / 10.0) * factor, dim=-1))


def test_raw_scores_from_fused_gemm():
    x, g, _, _ = make_inputs(5)
    weight, bias = torch.randn(D_OUT, D_IN), torch.randn(D_OUT)
    prepared = routing.prepare_router_vectors(g)
    fused = routing.fuse_linear_and_router(weight, prepared)
    assert fused.shape[0] % routing.FUSED_ROWS_MULTIPLE == 0
    for fused_weight in (None, fused):
        base, raw = routing.linear_and_router_scores(x, weight, prepared, bias=bias, fused_weight=fused_weight)
        torch.testing.assert_close(base, F.linear(x, weight, bias), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(raw, x @ prepared.T, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(routing.router_probs(x, prepared, raw_scores=raw),
                                   routing.router_probs(x, prepared), atol=1e-6, rtol=1e-5)
    # The whole routed layer, accumulating in place into the strided base view of the fused GEMM output.
    _, _, layer1, layer2 = make_inputs(5)
    expected = F.linear(x, weight, bias) + routing.dense_reference(x, g, layer1, layer2, 2, True, 0.25)
    with torch.no_grad():
        base, raw = routing.linear_and_router_scores(x, weight, prepared, bias=bias, fused_weight=fused)
        assert not base.is_contiguous()
        got, _ = routing.route_and_apply(x, prepared, layer1, layer2, 2, True, 0.25, raw_scores=raw, out=base)
    assert got.data_ptr() == base.data_ptr()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_top1_router_zeros_all_but_argmax():
    x, g, _, _ = make_inputs(6)
    prepared = routing.prepare_router_vectors(g)
    smear = routing.router_probs(x, prepared, router_type="smear")
    top1 = routing.router_probs(x, prepared, router_type="top1")
    best = smear.argmax(dim=-1, keepdim=True)
    assert ((top1 > 0).sum(dim=-1) == 1).all()
    torch.testing.assert_close(top1.gather(-1, best), smear.gather(-1, best))  # kept value not renormalised
    assert torch.equal(top1.argmax(dim=-1, keepdim=True), best)


def test_topk_weights_clamps_k_and_normalises():
    probs = torch.softmax(torch.randn(4, 3), dim=-1)
    indices, weights = routing.topk_weights(probs, 5, normalize_topk=False)
    assert indices.shape == weights.shape == (4, 3)
    torch.testing.assert_close(weights.sum(-1), torch.ones(4))
    indices, weights = routing.topk_weights(probs, 2, normalize_topk=True)
    assert set(indices[0].tolist()) == set(probs[0].topk(2).indices.tolist())
    kept = probs.gather(-1, indices)
    torch.testing.assert_close(weights, kept / (kept.sum(-1, keepdim=True) + 1e-6))
    with pytest.raises(ValueError):
        routing.topk_weights(probs, 0, True)


def test_k_larger_than_n_experts_is_clamped(lora_path):
    x, g, layer1, layer2 = make_inputs(3)
    expected = routing.dense_reference(x, g, layer1, layer2, 3, False, 1.0 / RANK)
    torch.testing.assert_close(routed(x, g, layer1, layer2, 10, False), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("grad_mode", [True, False])
def test_experts_without_tokens_and_zero_weights(grad_mode, lora_path):
    x, _, layer1, layer2 = make_inputs(6, lead=(8,))
    indices = torch.tensor([[0, 2]] * 4 + [[2, 5]] * 4)  # experts 1, 3, 4 get no token
    weights = torch.rand(8, 2)
    weights[1, 0] = 0.0  # a kept slot with weight exactly 0 contributes nothing
    weights[6] = 0.0
    expected = torch.zeros(8, D_OUT)
    for t in range(8):
        for j in range(2):
            e = indices[t, j]
            expected[t] += weights[t, j] * (x[t] @ layer1[e] @ layer2[e]) * 0.5
    x, layer1, layer2, weights = as_leaves((x, layer1, layer2, weights), grad_mode)
    got = routing.routed_lora(x, layer1, layer2, indices, weights, 0.5)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(got[6], torch.zeros(D_OUT))


@pytest.mark.parametrize("grad_mode", [True, False])
def test_out_argument_accumulates(grad_mode, lora_path):
    x, _, layer1, layer2 = make_inputs(4)
    indices = torch.randint(0, 4, (3, 5, 2))
    weights = torch.rand(3, 5, 2)
    gate = torch.zeros(3, 5, 4).scatter_add(-1, indices, weights)  # repeated experts in a token add up
    delta = torch.einsum("...n,...d,ndr,nro->...o", gate, x, layer1, layer2) * 0.25
    start = torch.randn(3, 5, D_OUT)
    x, layer1, layer2, weights = as_leaves((x, layer1, layer2, weights), grad_mode)
    got = routing.routed_lora(x, layer1, layer2, indices, weights, 0.25, out=start.clone())
    torch.testing.assert_close(got, start + delta, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_experts,k", [(1, 1), (5, 2)])
def test_gradients_match_dense_reference(n_experts, k, lora_path):
    x, g, layer1, layer2 = make_inputs(n_experts, seed=7)
    grads = []
    for fn in (routed, routing.dense_reference):
        leaves = [t.clone().requires_grad_() for t in (x, g, layer1, layer2)]
        upstream = torch.randn(3, 5, D_OUT, generator=torch.Generator().manual_seed(1))
        if fn is routed:
            out = routed(*leaves, k, True)
        else:
            out = routing.dense_reference(*leaves, k, True, 1.0 / RANK)
        (out * upstream).sum().backward()
        grads.append([t.grad for t in leaves])
    for name, got, expected in zip(("x", "g", "layer1", "layer2"), *grads):
        if name == "g" and n_experts == 1:  # a single expert's probability is 1 whatever g: no gradient
            assert got is None or torch.count_nonzero(got) == 0
            continue
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4, msg=f"gradient of {name}")


def test_bf16_activations(lora_path):
    x, g, layer1, layer2 = make_inputs(4)
    expected = routing.dense_reference(x.bfloat16().float(), g, layer1, layer2, 2, True, 1.0 / RANK)
    for grad_mode in (True, False):
        got = routed(*as_leaves((x.bfloat16(), g, layer1, layer2), grad_mode), 2, True)  # bf16 x, fp32 experts
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), expected, atol=2e-2, rtol=2e-2)
    # Everything bf16 (gradients flow through the bf16 path too).
    leaves = [t.bfloat16().requires_grad_() for t in (x, g, layer1, layer2)]
    got = routed(*leaves, 2, True)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), routing.dense_reference(*[t.detach().float() for t in leaves], 2, True,
                                                                    1.0 / RANK), atol=0.1, rtol=5e-2)
    got.float().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad.float()).all() for t in leaves)


@pytest.mark.parametrize("n_experts", [1, 20])
def test_no_tokens(n_experts):
    x, g, layer1, layer2 = make_inputs(n_experts, lead=(0,))
    for grad_mode in (True, False):
        xl, gl, l1, l2 = as_leaves((x, g, layer1, layer2), grad_mode)
        delta, probs = routing.route_and_apply(xl, routing.prepare_router_vectors(gl), l1, l2, 2, True, 0.25)
        assert delta.shape == (0, D_OUT) and probs.shape == (0, n_experts)


def test_bad_arguments():
    x, g, layer1, layer2 = make_inputs(3)
    with pytest.raises(ValueError):
        routing.prepare_router_vectors(g, "euclid")
    with pytest.raises(ValueError):
        routing.router_probs(x, g, router_type="top2")
    with pytest.raises(ValueError):
        routing.routed_lora(x, layer1[:, :-1], layer2, torch.zeros(3, 5, 1, dtype=torch.long), torch.ones(3, 5, 1), 1.0)


@pytest.mark.parametrize("grad_mode", [True, False])
@pytest.mark.parametrize("path", ["grouped", "grouped-loop"])
def test_many_experts_with_skewed_routing(grad_mode, path, monkeypatch):
    # One expert chosen by nearly every token, others rarely or never: groups of very different sizes, empty ones.
    if path == "grouped-loop":
        monkeypatch.setattr(routing, "GROUPED_MM_DTYPES", ())
    n_experts, n_tokens = 40, 700
    x, _, layer1, layer2 = make_inputs(n_experts, lead=(n_tokens,), seed=5)
    gen = torch.Generator().manual_seed(6)
    popularity = torch.linspace(4.0, -4.0, n_experts)  # the first experts popular, the last ones rarely chosen
    popularity[0] = 10.0  # chosen by nearly every token
    probs = torch.softmax(torch.randn(n_tokens, n_experts, generator=gen) * 2 + popularity, dim=-1)
    indices, weights = routing.topk_weights(probs, 2, True)
    counts = torch.bincount(indices.reshape(-1), minlength=n_experts).tolist()
    assert counts[0] > n_tokens * 0.9 and 0 in counts
    gate = torch.zeros(n_tokens, n_experts).scatter(1, indices, weights)
    expected = torch.einsum("tn,td,ndr,nro->to", gate, x, layer1, layer2) * 0.5
    x, layer1, layer2, weights = as_leaves((x, layer1, layer2, weights), grad_mode)
    got = routing.routed_lora(x, layer1, layer2, indices, weights, 0.5)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)
    if grad_mode:
        got.square().sum().backward()
        assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (x, layer1, layer2, weights))


@pytest.mark.parametrize("routing_kind", ["uniform", "skewed", "few_tokens", "repeats"])
@pytest.mark.parametrize("layout", ["padded", "padded-overflow", "unpadded", "gathered"])
def test_in_place_layouts_match_explicit_sum(routing_kind, layout, monkeypatch):
    """Both in-place layouts against the sum over pairs: padding slots add nothing, and with a capacity below the
    largest count ("padded-overflow", forced here) the busier experts' other rows go unpadded exactly once."""
    monkeypatch.setattr(routing, "DENSE_MAX_EXPERTS_PER_K", 0)
    monkeypatch.setattr(routing, "GATHERED_WEIGHTS_MAX_PAIRS_PER_EXPERT", 10**9 if layout == "gathered" else 0)
    monkeypatch.setattr(routing.torch, "get_num_threads", lambda: 1 if layout == "unpadded" else 2)
    if layout == "unpadded":
        monkeypatch.setattr(routing, "ONE_THREAD_PADDING_ROWS", -10**9)
    if layout == "padded-overflow":
        monkeypatch.setattr(routing, "PADDED_ROWS_PER_PAIR", 0.5)
        monkeypatch.setattr(routing, "MIN_PADDED_CAPACITY", 1)
    n_experts, n_tokens = 12, 90
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(n_tokens, D_IN, generator=gen)
    layer1 = torch.randn(n_experts, D_IN, RANK, generator=gen)
    layer2 = torch.randn(n_experts, RANK, D_OUT, generator=gen)
    if routing_kind == "uniform":
        indices = torch.stack([torch.randperm(n_experts, generator=gen)[:2] for _ in range(n_tokens)])
    elif routing_kind == "skewed":  # expert 0 in every token, a few others, most never
        indices = torch.stack([torch.zeros(n_tokens, dtype=torch.long),
                               torch.randint(1, 4, (n_tokens,), generator=gen)], 1)
    elif routing_kind == "few_tokens":
        x, indices = x[:3], torch.tensor([[5, 7], [7, 11], [0, 5]])
        n_tokens = 3
    else:  # the same expert twice in a token: both pairs count
        indices = torch.randint(0, n_experts, (n_tokens, 2), generator=gen)
        indices[::3, 1] = indices[::3, 0]
    weights = torch.rand(n_tokens, 2, generator=gen)
    start = torch.randn(n_tokens, D_OUT, generator=gen)
    expected = start.clone()
    for t in range(n_tokens):
        for j in range(2):
            e = indices[t, j]
            expected[t] += weights[t, j] * (x[t] @ layer1[e] @ layer2[e]) * 0.5
    with torch.no_grad():
        got = routing.routed_lora(x, layer1, layer2, indices, weights, 0.5, out=start.clone())
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)


def test_grouped_mm_takes_aligned_operands_and_loops_otherwise():
    """F.grouped_mm where its stride rules hold, the per-expert loop elsewhere: the same products."""
    gen = torch.Generator().manual_seed(3)
    ends = torch.tensor([3, 3, 9, 10], dtype=torch.int32)  # an empty group, and uneven ones
    for d, r, dtype in ((24, 8, torch.float32), (7, 3, torch.float32), (24, 8, torch.bfloat16), (24, 4, torch.bfloat16),
                        (24, 8, torch.float64)):
        a = torch.randn(10, d, generator=gen).to(dtype)
        b = torch.randn(4, d, r, generator=gen).to(dtype)
        fits = routing._fits_grouped_mm(a) and routing._fits_grouped_mm(b)
        assert fits == (dtype != torch.float64 and d * dtype.itemsize % 16 == 0 and r * dtype.itemsize % 16 == 0)
        expected = torch.cat([a[:3] @ b[0], a[3:9] @ b[2], a[9:] @ b[3]])
        torch.testing.assert_close(routing._grouped_mm(a, b, ends), expected, atol=1e-2, rtol=1e-2)
    assert not routing._fits_grouped_mm(torch.randn(4, 24, 8).mT)  # last dim not contiguous


def test_gather_buffer_is_reused_and_never_returned():
    """The in-place path gathers into a per-thread buffer: repeated calls, in and out of inference mode, of
    different sizes, give the same results as the autograd path and never hand the buffer out."""
    x, _, layer1, layer2 = make_inputs(9, lead=(40,), d_in=32, d_out=16, rank=8)
    results = []
    for n_tokens, mode in ((40, torch.no_grad), (12, torch.inference_mode), (40, torch.inference_mode),
                           (25, torch.no_grad)):
        indices = torch.randint(0, 9, (n_tokens, 2), generator=torch.Generator().manual_seed(n_tokens))
        weights = torch.rand(n_tokens, 2, generator=torch.Generator().manual_seed(n_tokens + 1))
        expected = routing.routed_lora(x[:n_tokens], layer1, layer2, indices, weights, 0.5)
        with mode():
            got = routing.routed_lora(x[:n_tokens], layer1, layer2, indices, weights, 0.5)
            start = torch.randn(n_tokens, 16)
            accumulated = routing.routed_lora(x[:n_tokens], layer1, layer2, indices, weights, 0.5, out=start.clone())
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(accumulated, start + expected, atol=1e-5, rtol=1e-5)
        results.append(got)
    buffers = [b.data_ptr() for b in routing._SCRATCH.buffers.values()]
    assert all(r.data_ptr() not in buffers for r in results)


# ----- centring (beyond the paper): the scores see x - mu, the experts still see x ------------------------------


def shared_direction_inputs(n_tokens=200, n_experts=6, seed=5):
    """Decoder-like tokens: a large common component plus small token-specific parts."""
    gen = torch.Generator().manual_seed(seed)
    common = torch.randn(D_IN, generator=gen) * 20
    x = common + torch.randn(n_tokens, D_IN, generator=gen)
    g = torch.randn(n_experts, D_IN, generator=gen)
    return x, g


def test_centred_scores_match_direct_computation():
    x = torch.randn(4, 7, D_IN) * 3 + 1
    g = torch.randn(5, D_IN)
    mu = torch.randn(D_IN) * 2
    prepared = routing.prepare_router_vectors(g)
    direct = F.layer_norm(x - mu, (D_IN,), eps=1e-5) @ F.layer_norm(g, (D_IN,), eps=1e-5).T / math.sqrt(D_IN)
    got = routing.router_scores(x, prepared, input_mean=mu)
    torch.testing.assert_close(got, direct, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(routing.router_probs(x, prepared, input_mean=mu), torch.softmax(direct, -1),
                               atol=1e-6, rtol=1e-5)
    uncentred = routing.router_scores(x, prepared)
    assert (uncentred - got).abs().max() > 1e-2  # the mean does change the scores
    # No mean: exactly the uncentred computation.
    assert torch.equal(routing.router_scores(x, prepared, input_mean=None), uncentred)
    # Other score types centre the same way.
    direct_dot = (x - mu) @ g.T
    torch.testing.assert_close(routing.router_scores(x, g, "dot", scaling_scores=False, input_mean=mu), direct_dot,
                               atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("grad_mode", [True, False])
def test_centred_routed_matches_dense_reference(grad_mode, lora_path):
    x, g, layer1, layer2 = make_inputs(7, seed=11)
    mu = torch.randn(D_IN) + x.mean(dim=(0, 1))
    with torch.no_grad():
        expected = routing.dense_reference(x, g, layer1, layer2, 2, True, 1.0 / RANK, input_mean=mu)
        uncentred = routing.dense_reference(x, g, layer1, layer2, 2, True, 1.0 / RANK)
    assert (expected - uncentred).abs().max() > 1e-3
    leaves = as_leaves((x, g, layer1, layer2), grad_mode)
    got = routed(*leaves, 2, True, input_mean=mu)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_dense_reference_centres_scores_only():
    """The reference itself, against an explicit loop: gates from x - mu, expert products on x."""
    x, g, layer1, layer2 = make_inputs(4, lead=(6,), seed=2)
    mu = torch.randn(D_IN)
    probs = torch.softmax(F.layer_norm(x - mu, (D_IN,)) @ F.layer_norm(g, (D_IN,)).T / math.sqrt(D_IN), dim=-1)
    expected = torch.zeros(6, D_OUT)
    for t in range(6):
        kept, chosen = probs[t].topk(2)
        kept = kept / (kept.sum() + 1e-6)
        for p, e in zip(kept, chosen):
            expected[t] += p * (x[t] @ layer1[e] @ layer2[e]) * 0.5
    got = routing.dense_reference(x, g, layer1, layer2, 2, True, 0.5, input_mean=mu)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_centred_scores_from_fused_gemm():
    x, g, layer1, layer2 = make_inputs(5)
    mu = torch.randn(D_IN)
    weight, bias = torch.randn(D_OUT, D_IN), torch.randn(D_OUT)
    prepared = routing.prepare_router_vectors(g)
    fused = routing.fuse_linear_and_router(weight, prepared)
    with torch.no_grad():
        base, raw = routing.linear_and_router_scores(x, weight, prepared, bias=bias, fused_weight=fused)
        torch.testing.assert_close(routing.router_scores(x, prepared, raw_scores=raw, input_mean=mu),
                                   routing.router_scores(x, prepared, input_mean=mu), atol=1e-5, rtol=1e-5)
        got, _ = routing.route_and_apply(x, prepared, layer1, layer2, 2, True, 0.25, raw_scores=raw, out=base,
                                         input_mean=mu)
    expected = F.linear(x, weight, bias) + routing.dense_reference(x, g, layer1, layer2, 2, True, 0.25, input_mean=mu)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_centring_removes_the_score_common_to_all_tokens():
    """Tokens sharing one direction all pick the same expert; centred on their mean, they spread out."""
    x, g = shared_direction_inputs()
    prepared = routing.prepare_router_vectors(g)
    top_plain = routing.router_probs(x, prepared).argmax(dim=-1)
    top_centred = routing.router_probs(x, prepared, input_mean=x.mean(dim=0)).argmax(dim=-1)
    plain_share = torch.bincount(top_plain, minlength=6).max().item() / len(x)
    centred_share = torch.bincount(top_centred, minlength=6).max().item() / len(x)
    assert plain_share > 0.95
    assert centred_share < 0.5


def test_bad_input_mean_shape():
    x, g, _, _ = make_inputs(3)
    with pytest.raises(ValueError, match="input_mean must have shape"):
        routing.router_scores(x, routing.prepare_router_vectors(g), input_mean=torch.zeros(D_IN + 1))


# ----- the score-type table: every entry, fast path against its own dense reference -------------------------


def table_inputs(score_type, seed=13):
    """Inputs for one table entry; router weights (random, positive) only for a type that learns them."""
    x, g, layer1, layer2 = make_inputs(6, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    weights = torch.rand(D_IN, generator=gen) + 0.5 if routing.SCORE_TYPES[score_type].learned_router_weights else None
    return x, g, layer1, layer2, weights


@pytest.mark.parametrize("score_type", list(routing.SCORE_TYPES))
@pytest.mark.parametrize("centred", [False, True])
@pytest.mark.parametrize("fused", [False, True])
def test_every_score_type_matches_its_dense_reference(score_type, centred, fused):
    x, g, layer1, layer2, weights = table_inputs(score_type)
    mu = torch.randn(D_IN) if centred else None
    kwargs = dict(score_type=score_type, scaling_scores=True, temperature=3.0, input_mean=mu)
    expected = routing.dense_reference(x, g, layer1, layer2, 2, True, 0.25, router_weights=weights, **kwargs)
    prepared = routing.prepare_router_vectors(g, score_type, router_weights=weights)
    weight = torch.randn(D_OUT, D_IN)
    base, raw = routing.linear_and_router_scores(x, weight, prepared) if fused else (None, None)
    with torch.no_grad():
        got, _ = routing.route_and_apply(x, prepared, layer1, layer2, 2, True, 0.25, raw_scores=raw, out=base,
                                         **kwargs)
    if fused:
        expected = F.linear(x, weight) + expected
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_weighted_cosine_is_cosine_with_weighted_router_vectors():
    x, g, _, _, weights = table_inputs("weighted_cosine")
    expected = F.normalize(x, dim=-1) @ (F.normalize(g, dim=-1) * weights).T / math.sqrt(D_IN)
    prepared = routing.prepare_router_vectors(g, "weighted_cosine", router_weights=weights)
    torch.testing.assert_close(routing.router_scores(x, prepared, "weighted_cosine"), expected, atol=1e-6, rtol=1e-5)
    # Without weights (their initial value, ones) it is the cosine score.
    torch.testing.assert_close(routing.router_scores(x, routing.prepare_router_vectors(g, "weighted_cosine"),
                                                     "weighted_cosine"),
                               routing.router_scores(x, routing.prepare_router_vectors(g, "cosine"), "cosine"))
    with pytest.raises(ValueError, match="no learned router weights"):
        routing.prepare_router_vectors(g, "cosine", router_weights=weights)


def test_unknown_score_type_names_the_table():
    x, g, layer1, layer2 = make_inputs(3)
    for call in (lambda: routing.router_scores(x, g, "euclid"),
                 lambda: routing.dense_reference(x, g, layer1, layer2, 2, True, 1.0, score_type="euclid")):
        with pytest.raises(ValueError, match="score_type must be one of .*'original'.*'arrow'"):
            call()


# ----- threads: the routed path's small operations run on one intra-op thread ------------------------------------


@pytest.mark.parametrize("serial", [True, False])
def test_serial_small_ops_give_the_same_results_and_restore_the_thread_count(serial, monkeypatch):
    """SERIAL_SMALL_OPS only changes how many threads the small operations use: the same numbers either way, and
    the caller's thread count is back afterwards, also when a call raises."""
    monkeypatch.setattr(routing, "SERIAL_SMALL_OPS", serial)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x, g, layer1, layer2 = make_inputs(20, lead=(6, 7), d_in=32, d_out=16, rank=8)
        mu = torch.randn(32)
        with torch.no_grad():
            expected = routing.dense_reference(x, g, layer1, layer2, 2, True, 0.25, input_mean=mu)
            got, _ = routing.route_and_apply(x, routing.prepare_router_vectors(g), layer1, layer2, 2, True, 0.25,
                                             input_mean=mu)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        assert torch.get_num_threads() == 2
        with pytest.raises(ValueError):
            routing.routed_lora(x, layer1[:, :-1], layer2, torch.zeros(6, 7, 2, dtype=torch.long), torch.ones(6, 7, 2),
                                1.0)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_serial_section_runs_on_one_thread(monkeypatch):
    seen = []
    real_topk = torch.topk
    monkeypatch.setattr(torch, "topk", lambda *a, **k: seen.append(torch.get_num_threads()) or real_topk(*a, **k))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(routing, "SERIAL_SMALL_OPS", True)
        routing.topk_weights(torch.softmax(torch.randn(5, 9), -1), 2, True)
        monkeypatch.setattr(routing, "SERIAL_SMALL_OPS", False)
        routing.topk_weights(torch.softmax(torch.randn(5, 9), -1), 2, True)
    finally:
        torch.set_num_threads(threads)
    assert seen == [1, 2]
