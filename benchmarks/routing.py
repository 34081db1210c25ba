"""Cost of a PHATGOOSE-routed linear layer relative to the frozen base linear, CPU fp32.

Run: .venv/bin/python benchmarks/routing.py [--repeats 41] [--threads 2] [--profile]

For N experts (d_in = d_out = 768, T = 2048 tokens, rank 16, top-2, normalised), times one forward of
  base           x @ W
  addons         the same layer as a routed model runs it: nn.Linear + ExposeHidden, Router, FFNExperts addons
                 (forward hooks; the router product is its own GEMM)
  addons-serial  (only with more than one thread) the same with routing.SERIAL_SMALL_OPS = True: every routed
                 operation but the router product on one thread (for cores shared with other work)
  ours           colm.moma.routing: one GEMM for x W^T and the router scores (fused weight built once, outside
                 the timed region, like the prepared router vectors), router_probs, topk_weights, routed_lora
                 accumulated into the base output
  original-style per-expert tensors stacked every forward, LayerNorm on both sides, softmax, top-k, a dense
                 (T x N) gate matrix, then a loop over ALL N experts on the tokens selected by a boolean mask
  dense          every expert on every token (einsum), weighted by the same gate
All variants run interleaved, repeat after repeat (base first, the others in a shuffled order), and each ratio
is a median over repeats of the same-repeat base time. floor = FLOPs of (base + router product + chosen LoRA
products) / FLOPs of base.
--threads: intra-op threads (default: every core). --profile: afterwards, where the addons layer spends its time
at the largest N (torch.profiler, operators by self CPU time).
"""

import argparse
import functools
import math
import os
import random
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import interleaved_times  # noqa: E402  (benchmarks/common.py)

from colm.moma import routing  # noqa: E402
from colm.moma.addons import insert_addon  # noqa: E402
from colm.moma.hiddens import ExposeHidden  # noqa: E402
from colm.moma.moe import FFNExperts, MoELink, Router  # noqa: E402

T, D_IN, D_OUT, RANK, TOP_K = 2048, 768, 768, 16, 2
EXPERT_COUNTS = (1, 8, 36, 166)


def make_layer(n_experts, generator):
    def randn(*shape, std=1.0):
        return torch.randn(*shape, generator=generator) * std

    return {
        "x": randn(T, D_IN),
        "W": randn(D_IN, D_OUT, std=D_IN**-0.5),  # base weight as in x @ W
        "gates": [randn(D_IN) for _ in range(n_experts)],
        "layer1": [randn(D_IN, RANK, std=0.02) for _ in range(n_experts)],
        "layer2": [randn(RANK, D_OUT, std=0.02) for _ in range(n_experts)],
    }


def base_forward(layer):
    return layer["x"] @ layer["W"]


def make_ours(layer):
    """Everything computed once per checkpoint load; the returned closure is one routed forward."""
    weight = layer["W"].T.contiguous()  # F.linear layout (d_out, d_in)
    prepared = routing.prepare_router_vectors(torch.stack(layer["gates"]), "original")
    fused = routing.fuse_linear_and_router(weight, prepared)
    layer1, layer2 = torch.stack(layer["layer1"]), torch.stack(layer["layer2"])
    x = layer["x"]

    def forward():
        base, raw = routing.linear_and_router_scores(x, weight, prepared, fused_weight=fused)
        out = base.contiguous()  # the layer's output buffer; dY is index-added into it
        out, _ = routing.route_and_apply(x, prepared, layer1, layer2, TOP_K, True, 1.0 / RANK,
                                         raw_scores=raw, out=out)
        return out

    return forward


def make_addons(layer):
    """The layer exactly as a routed model runs it: an nn.Linear hosting ExposeHidden, Router and FFNExperts
    addons (colm/moma/moe.py), called like any module. The router product is a separate GEMM here."""
    linear = torch.nn.Linear(D_IN, D_OUT, bias=False)
    linear.weight.data = layer["W"].T.contiguous()
    shared, link = {}, MoELink()
    hidden_key, weights_key = ("hidden_states", "expose", "layer"), ("routing_weights", "router", "layer")
    expose = ExposeHidden(shared, "layer", hidden_key, None, reduction_method=None)
    router = Router(shared, "layer", link, hidden_key, weights_key, linear, None, d_router=D_IN)
    experts = FFNExperts(shared, "layer", link, weights_key, linear, None, d_in=D_IN, d_out=D_OUT, d_bottleneck=RANK,
                         topk_value=TOP_K, normalize_topk=True, divide_by_d_bottleneck=True)
    link.extend(len(layer["gates"]))
    with torch.no_grad():
        router.expert_embeddings.copy_(torch.stack(layer["gates"]))
        experts.layer1.copy_(torch.stack(layer["layer1"]))
        experts.layer2.copy_(torch.stack(layer["layer2"]))
    for module in (linear, router, experts):
        module.requires_grad_(False)  # as at evaluation (Model.trainable_params = "none")
    insert_addon(linear, "expose", expose, "last")
    insert_addon(linear, "router", router, "last")
    insert_addon(linear, "expert_lora", experts, "inner")
    x = layer["x"]
    return lambda: linear(x)


def serial(fn):
    """fn with the routed operations but the router product on one thread (routing.SERIAL_SMALL_OPS = True)."""
    def forward():
        saved, routing.SERIAL_SMALL_OPS = routing.SERIAL_SMALL_OPS, True
        try:
            return fn()
        finally:
            routing.SERIAL_SMALL_OPS = saved

    return forward


def original_style_forward(layer):
    """Written from the description of the original implementation (not optimised on purpose)."""
    x, n_experts = layer["x"], len(layer["gates"])
    layer1 = torch.stack(layer["layer1"])  # stacked every forward
    layer2 = torch.stack(layer["layer2"])
    gates = torch.stack(layer["gates"])
    scores = F.layer_norm(x, (D_IN,)) @ F.layer_norm(gates, (D_IN,)).T * math.sqrt(1.0 / D_IN)
    probs = torch.softmax(scores, dim=-1)
    top_p, top_i = torch.topk(probs, min(TOP_K, n_experts), dim=-1)
    top_p = top_p / (top_p.sum(dim=-1, keepdim=True) + 1e-6)
    gate = torch.zeros_like(probs).scatter(1, top_i, top_p)  # (T, N), zero outside the top k
    moe = torch.zeros(T, D_OUT)
    for i in range(n_experts):
        mask = gate[:, i] > 0
        rows = mask.nonzero().squeeze(1)
        expert_out = (x[mask] @ layer1[i]) @ layer2[i] * (gate[mask, i].unsqueeze(1) / RANK)
        moe.index_add_(0, rows, expert_out)
    return x @ layer["W"] + moe


def make_dense(layer):
    prepared = routing.prepare_router_vectors(torch.stack(layer["gates"]), "original")
    layer1, layer2 = torch.stack(layer["layer1"]), torch.stack(layer["layer2"])
    x, W = layer["x"], layer["W"]

    def forward():
        probs = routing.router_probs(x, prepared)
        indices, weights = routing.topk_weights(probs, TOP_K, True)
        gate = torch.zeros_like(probs).scatter(1, indices, weights)
        hidden = torch.einsum("td,ndr->tnr", x, layer1) * gate.unsqueeze(2)
        return x @ W + torch.einsum("tnr,nro->to", hidden, layer2) / RANK

    return forward


def flop_floor(n_experts):
    k = min(TOP_K, n_experts)
    base = 2 * T * D_IN * D_OUT
    return (base + 2 * T * n_experts * D_IN + 2 * T * k * RANK * (D_IN + D_OUT)) / base


def profile(fn, n_experts, steps=10):
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
    print(f"\naddons layer at N={n_experts}, {steps} forwards, operators by self CPU time:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=41)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, T={T}, d_in=d_out={D_IN}, r={RANK}, "
          f"k={TOP_K}, fp32, {args.repeats} interleaved repeats, medians\n")
    generator = torch.Generator().manual_seed(0)
    order = random.Random(0)
    rows, ours_ratio, addons_ratio = [], {}, {}
    with torch.inference_mode():
        for n_experts in EXPERT_COUNTS:
            layer = make_layer(n_experts, generator)
            variants = {"base": functools.partial(base_forward, layer), "ours": make_ours(layer),
                        "addons": make_addons(layer)}
            if torch.get_num_threads() > 1:
                variants["addons-serial"] = serial(variants["addons"])
            variants["original-style"] = functools.partial(original_style_forward, layer)
            variants["dense"] = make_dense(layer)
            expected = variants["dense"]()
            for name in variants:  # sanity: all variants compute the same layer
                if name not in ("base", "dense"):
                    error = (variants[name]() - expected).abs().max().item()
                    assert error < 1e-3, f"{name} differs from dense by {error} at N={n_experts}"
            for fn in variants.values():  # warm-up
                fn()
            times = interleaved_times(variants, args.repeats, order)
            ratio = {name: statistics.median(t / b for t, b in zip(times[name], times["base"])) for name in variants}
            ours_ratio[n_experts], addons_ratio[n_experts] = ratio["ours"], ratio["addons"]
            mt = f"{ratio['addons-serial']:.2f}" if "addons-serial" in ratio else "-"
            rows.append(f"| {n_experts} | {ratio['ours']:.2f} | {ratio['addons']:.2f} | {mt} "
                        f"| {ratio['original-style']:.2f} | {ratio['dense']:.2f} "
                        f"| {flop_floor(n_experts):.2f} | {statistics.median(times['base']) * 1e3:.1f} |")
    print("| N | ours/base | addons/base | addons-serial/base | original-style/base | dense/base | floor | base ms |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    first, last = EXPERT_COUNTS[0], EXPERT_COUNTS[-1]
    print(f"\nN={last} over N={first} (ratio of the x/base ratios): ours {ours_ratio[last] / ours_ratio[first]:.2f}, "
          f"addons {addons_ratio[last] / addons_ratio[first]:.2f}")
    if args.profile:
        with torch.inference_mode():
            fn = make_addons(make_layer(last, generator))
            fn()
            profile(fn, last)


if __name__ == "__main__":
    main()
