"""Router scoring + top-k among many experts: exhaustive against the cluster index of colm/moma/ocean.py, CPU fp32.

Run: .venv/bin/python benchmarks/ocean.py [--repeats 7] [--dims 768 128] [--experts 166 1024 4096] [--threads 1]

For N router vectors of width d and T = 2048 tokens, top-2 with renormalised weights, "original" score, times
  router   what the Router and FFNExperts addons compute today: routing.router_probs (x @ P^T, softmax over N)
           then routing.topk_weights
  top-k    exhaustive without the softmax over N: x @ P^T, the top k of those raw scores, the score type's factor
           and the softmax on the kept only (ocean.topk_routing with a one-cluster index, which scores everything:
           the same code as exact and approx less the index; shows how much of their gain needs no index at all)
  exact    ocean.topk_routing(mode="exact"): clusters pruned by the Cauchy-Schwarz bound, same top-k
  approx   ocean.topk_routing(mode="approximate"): the bound's deviation term counted as ocean.DEFAULT_SIGMAS standard
           deviations of a random direction instead of its worst case
The index is built once per router vector set, outside the timed region (like the prepared router vectors);
its build time is printed. All variants run interleaved, repeat after repeat; a speed-up is the median over
repeats of the same-repeat router time over the variant's time, printed beside the variant's median time. agree = share of tokens whose top-k expert set
equals the router's; scored = (token, expert) dot products computed / T*N (centroids excluded).

Four worlds (vectors, tokens), because how much the bound prunes depends on both:
  random            router vectors and tokens i.i.d. N(0, I): no structure, the worst case for clusters
  clustered         router vectors around round(sqrt(N)) centres (centre + 0.5 * N(0, I), as experts of
                    related tasks share structure); tokens i.i.d. N(0, I), unrelated to any expert
  clustered+tasks   the same router vectors; each token is 0.5 * one expert's router vector + N(0, I), as a
                    token of that expert's task would be (the gate was trained on such tokens)
  tight+tasks       as clustered+tasks with tighter clusters (centre + 0.25 * N(0, I)): where exact pruning pays
"""

import argparse
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from colm.moma import ocean, routing  # noqa: E402

T, TOP_K = 2048, 2
WORLDS = {"random": None, "clustered": 0.5, "clustered+tasks": 0.5, "tight+tasks": 0.25}  # world: spread
TOKEN_SIGNAL = 0.5


def make_world(world, n_experts, d, generator):
    """(router vectors g (N, d), tokens x (T, d)) of one world (see the module docstring)."""
    if world == "random":
        return torch.randn(n_experts, d, generator=generator), torch.randn(T, d, generator=generator)
    centres = torch.randn(round(math.sqrt(n_experts)), d, generator=generator)
    owner = torch.randint(0, centres.shape[0], (n_experts,), generator=generator)
    g = centres[owner] + WORLDS[world] * torch.randn(n_experts, d, generator=generator)
    x = torch.randn(T, d, generator=generator)
    if world.endswith("+tasks"):
        x = x + TOKEN_SIGNAL * g[torch.randint(0, n_experts, (T,), generator=generator)]
    return g, x


def make_variants(prepared, index, x):
    def router():
        return routing.topk_weights(routing.router_probs(x, prepared), TOP_K, True)

    everything = ocean.build_index(prepared, n_clusters=1)
    return {"router": router, "top-k": lambda: ocean.topk_routing(everything, x, TOP_K),
            "exact": lambda: ocean.topk_routing(index, x, TOP_K, mode="exact"),
            "approx": lambda: ocean.topk_routing(index, x, TOP_K, mode="approximate")}


def same_sets(a, b):
    return (a.sort(dim=-1).values == b.sort(dim=-1).values).all(dim=-1).float().mean().item()


def tie_gaps(prepared, x, chosen, reference):
    """For tokens whose chosen experts differ from the reference's: the largest gap between the k best scores and
    the chosen experts' scores (sorted), relative to the largest score magnitude (0 for a tie)."""
    differ = (chosen.sort(dim=-1).values != reference.sort(dim=-1).values).any(dim=-1)
    if not differ.any():
        return []
    scores = routing.router_scores(x[differ], prepared)
    best = torch.topk(scores, chosen.shape[-1], dim=-1).values.sort(dim=-1).values
    picked = scores.gather(-1, chosen[differ]).sort(dim=-1).values
    return ((best - picked).abs().max(dim=-1).values / scores.abs().max()).tolist()


def scored_fraction(index, x, mode):
    _, searched = ocean.search_tokens(x)
    return ocean.search(index, searched, TOP_K, mode).pairs_scored / (x.shape[0] * index.n_experts)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dims", type=int, nargs="+", default=[768, 128])
    parser.add_argument("--experts", type=int, nargs="+", default=[166, 1024, 4096])
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (one, as the project runs)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, T={T}, k={TOP_K}, fp32, "
          f"{args.repeats} interleaved repeats, medians; ocean: default clusters (about 2 sqrt(N)), "
          f"approx sigmas {ocean.DEFAULT_SIGMAS}\n")
    print("| d | N | world | clusters | build ms | router ms | top-k ms (speed-up) | exact | approx | exact agree "
          "| approx agree "
          "| exact scored | approx scored |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    generator = torch.Generator().manual_seed(0)
    exact_gaps = []
    with torch.inference_mode():
        for d in args.dims:
            for n_experts in args.experts:
                for world in WORLDS:
                    g, x = make_world(world, n_experts, d, generator)
                    prepared = routing.prepare_router_vectors(g, "original")
                    start = time.perf_counter()
                    index = ocean.build_index(prepared)
                    build = time.perf_counter() - start
                    variants = make_variants(prepared, index, x)
                    results = {name: fn() for name, fn in variants.items()}  # also the warm-up
                    reference = results["router"][0]
                    exact_gaps += tie_gaps(prepared, x, results["exact"][0], reference)
                    times = {name: [] for name in variants}
                    for _ in range(args.repeats):
                        for name, fn in variants.items():
                            start = time.perf_counter()
                            fn()
                            times[name].append(time.perf_counter() - start)
                    speedup = {name: statistics.median(r / t for r, t in zip(times["router"], times[name]))
                               for name in variants}
                    ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
                    cells = " | ".join(f"{ms[name]:.1f} ({speedup[name]:.2f}x)" for name in ("top-k", "exact", "approx"))
                    print(f"| {d} | {n_experts} | {world} | {index.n_clusters} | {build * 1e3:.0f} "
                          f"| {ms['router']:.1f} | {cells} "
                          f"| {same_sets(results['exact'][0], reference):.4f} "
                          f"| {same_sets(results['approx'][0], reference):.4f} "
                          f"| {scored_fraction(index, x, 'exact'):.3f} | {scored_fraction(index, x, 'approximate'):.3f} |",
                          flush=True)
    print("\nms: median time; speed-up: median of router time / variant time (higher is faster); exact scored "
          "1.000: nothing was pruned and exact mode scored every expert at once.")
    print(f"exact mode: {len(exact_gaps)} token(s) in all worlds with another top-k set than the router's; largest "
          f"score gap to the router's top k, relative to the largest |score|: {max(exact_gaps, default=0.0):.1e} "
          "(a tie within float rounding)")


if __name__ == "__main__":
    main()
