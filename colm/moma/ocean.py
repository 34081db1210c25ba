"""Top-k routing among many experts ("an ocean") without scoring every expert: a cluster index over one router's
prepared vectors.

Exhaustive routing (colm/moma/routing.py) scores every token against every expert, x @ P^T (2*T*N*d FLOPs), then
takes a softmax over all N and keeps the top k. With renormalised top-k weights only the k best scores of a token
matter: p_j / sum_{i in top-k} p_i = exp(s_j) / sum_{i in top-k} exp(s_i), the softmax over the kept scores.
(`routing.topk_weights` divides by (sum + eps), eps = 1e-6: the weights here are the eps = 0 ones. They differ
from the routing path's by the factor (Q + eps) / Q, Q the kept softmax mass over all N experts; Q >= k / N, so
the relative difference is below eps / Q <= eps * N / k: 5e-4 at N = 1024, k = 2 if every expert scores the
same, about 1e-5 where the top k take a few percent of the mass.)

The index (`build_index`, once per set of prepared vectors): seeded k-means clusters of the rows of P, each with
its centroid c and radius r = max ||P_j - c|| over its members. For a token y and any member j of a cluster,
    y . P_j = y . c + y . (P_j - c) <= y . c + ||y|| r        (Cauchy-Schwarz).
`search`, for a block of tokens:
  1. scores every centroid (T x n_clusters), then every member of each token's nearest clusters (as few as hold
     k experts): theta, the token's k-th best score so far, is a lower bound of its k-th best score;
  2. exact: every other cluster whose bound is below theta (less a margin for float rounding) cannot hold a
     top-k expert and is skipped; the rest are scored, keeping the scores above theta.
     approximate: the same with the deviation term ||y|| r counted as `sigmas` standard deviations of a random
     direction, sigmas * ||y|| r / sqrt(d) (its top-k agreement with exhaustive scoring is measured by
     benchmarks/ocean.py and the tests).
  (token, cluster) pairs are grouped by cluster: one gather and GEMM per cluster over the tokens that need it.
  Blocks where most pairs survive, and blocks of too few tokens to amortise the per-cluster work (decoding
  steps), are scored exhaustively instead: the same answer.
Cost: T * n_clusters * d for the centroids plus d per scored (token, expert) pair; with about 2 sqrt(N) clusters
and a bounded number of surviving clusters per token, the cost grows like sqrt(N).

How much the bound prunes depends on the vectors and the tokens. Cauchy-Schwarz assumes the worst direction of
P_j - c, so in d = 768 exact pruning needs tokens that align with a tight cluster much better than with the
others. Random vectors (no clusters) are the worst case: nothing is pruned and both modes score everything.
benchmarks/ocean.py measures random and clustered vectors.

`topk_routing` applies a score type (routing.SCORE_TYPES; those that rank experts by x . P: "original", "dot",
"cosine") and centring to the search and returns (indices, weights) as `routing.topk_weights` would.
"""

import math
from dataclasses import dataclass

import torch

from colm.moma import routing

MODES = ("exact", "approximate")
# Score types whose score is (x . P_j) times a positive per-token factor: the top k of x . P is the top k of
# the scores. "arrow" (|x . P|) and learned router weights are left out.
SCORE_TYPES = tuple(name for name, spec in routing.SCORE_TYPES.items()
                    if spec.finish is None and not spec.learned_router_weights)
KMEANS_ITERATIONS = 20
SEED = 0
DEFAULT_SIGMAS = 4.0  # approximate mode: see `search`
# Fewer tokens than this per cluster: the per-cluster work costs more than it saves; score exhaustively.
MIN_TOKENS_PER_CLUSTER = 4
# Exact mode scores every pair at once when more than this share of the (token, cluster) pairs survive pruning.
EXHAUSTIVE_ABOVE = 0.25
# The rounding margin of the bound: a float32 dot product of length d is within about d * u * ||y|| * ||v|| of
# the exact one (u = 2^-24); three of them meet in the comparison (y . c, y . P_j, and theta's).
ROUNDING_UNITS = 3


def default_clusters(n_experts):
    """About 2 sqrt(N) clusters (at least 1, at most N)."""
    return max(1, min(n_experts, round(2 * math.sqrt(n_experts))))


@dataclass
class OceanIndex:
    """Clusters of the rows of `vectors` (N, d): cluster c holds the experts `members[c]` (a long tensor of
    indices into vectors), whose rows are `member_vectors[c]` (n_c, d); `centroids` (C, d), `radii` (C,) with
    ||vectors[j] - centroids[c]|| <= radii[c] for every member j; `max_norm` = max_j ||vectors[j]||."""

    vectors: torch.Tensor
    centroids: torch.Tensor
    radii: torch.Tensor
    members: list
    member_vectors: list
    max_norm: float

    @property
    def n_experts(self):
        return self.vectors.shape[0]

    @property
    def n_clusters(self):
        return self.centroids.shape[0]


def kmeans(vectors, n_clusters, iterations=KMEANS_ITERATIONS, seed=SEED):
    """Cluster assignment (N,) of the rows of vectors by Lloyd's k-means, from n_clusters distinct rows drawn with
    a seeded generator. Deterministic for given vectors, n_clusters and seed. Some clusters may end up empty."""
    n = vectors.shape[0]
    generator = torch.Generator().manual_seed(seed)
    start = torch.randperm(n, generator=generator)[:n_clusters].to(vectors.device)
    centroids = vectors.index_select(0, start).clone()
    assignment = None
    for _ in range(iterations):
        # ||v - c||^2 up to the per-row constant ||v||^2
        distances = centroids.square().sum(dim=1) - 2 * vectors @ centroids.T
        new_assignment = distances.argmin(dim=1)
        if assignment is not None and torch.equal(new_assignment, assignment):
            break
        assignment = new_assignment
        counts = torch.bincount(assignment, minlength=n_clusters)
        sums = torch.zeros_like(centroids).index_add_(0, assignment, vectors)
        filled = counts > 0  # an empty cluster keeps its centroid
        centroids[filled] = sums[filled] / counts[filled].unsqueeze(1).to(vectors.dtype)
    return assignment


def build_index(vectors, n_clusters=None, iterations=KMEANS_ITERATIONS, seed=SEED):
    """OceanIndex over prepared router vectors (N, d) (routing.prepare_router_vectors). n_clusters: None for
    default_clusters(N); clamped to N. Empty clusters are dropped. Built without autograd."""
    if vectors.dim() != 2 or vectors.shape[0] == 0:
        raise ValueError(f"an ocean index needs router vectors of shape (N >= 1, d), got {tuple(vectors.shape)}.")
    n_experts = vectors.shape[0]
    n_clusters = default_clusters(n_experts) if n_clusters is None else min(int(n_clusters), n_experts)
    if n_clusters < 1:
        raise ValueError(f"n_clusters must be >= 1, got {n_clusters}.")
    with torch.no_grad():
        vectors = vectors.detach()
        assignment = kmeans(vectors.float(), n_clusters, iterations, seed)
        members = [m for m in (torch.nonzero(assignment == c).squeeze(1) for c in range(n_clusters)) if m.numel()]
        member_vectors = [vectors.index_select(0, m).contiguous() for m in members]
        # Radii in float64 from the stored centroids, rounded up: the bound must hold for the float vectors.
        centroids = torch.stack([v.double().mean(dim=0) for v in member_vectors]).to(vectors.dtype)
        radii64 = torch.stack([(v.double() - c.double()).norm(dim=1).max() for v, c in zip(member_vectors, centroids)])
        radii = radii64.to(vectors.dtype)
        radii = torch.where(radii.double() < radii64, torch.nextafter(radii, torch.full_like(radii, math.inf)), radii)
        max_norm = float(vectors.double().norm(dim=1).max())
    return OceanIndex(vectors, centroids, radii, members, member_vectors, max_norm)


@dataclass
class SearchResult:
    """values, indices: (T, k) the k largest y . P_j of each token (unsorted) and their experts; pairs_scored: the
    number of (token, expert) dot products computed, centroids excluded (T * N for exhaustive scoring)."""

    values: torch.Tensor
    indices: torch.Tensor
    pairs_scored: int


def _min_clusters_for(index, k):
    """The fewest clusters that always hold at least k experts, whichever are picked."""
    sizes = sorted(m.numel() for m in index.members)
    total = 0
    for count, size in enumerate(sizes, start=1):
        total += size
        if total >= k:
            return count
    return len(sizes)


def _score_probes(index, y, probes, k):
    """Every member of cluster probes[t, s] for every token t and slot s: (values, indices), both (T, m * k),
    entry [t, s * k + j] the j-th best of that cluster for t (-inf where it has fewer than k experts).
    Pairs are grouped by cluster: one gather and GEMM per cluster. Also returns the number of dot products."""
    n_tokens, m = probes.shape
    flat = probes.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=index.n_clusters).tolist()
    tokens = torch.div(order, m, rounding_mode="floor")
    values, experts, scored = [], [], 0
    for c, group in enumerate(tokens.split(counts)):
        if group.numel() == 0:
            continue
        vectors = index.member_vectors[c]
        scores = y.index_select(0, group) @ vectors.T  # (pairs of c, n_c)
        scored += scores.numel()
        if vectors.shape[0] > k:
            best, local = torch.topk(scores, k, dim=1, sorted=False)
            values.append(best)
            experts.append(index.members[c][local])
            continue
        members, missing = index.members[c], k - vectors.shape[0]  # a cluster of at most k experts: all of them
        if missing:
            scores = torch.cat([scores, scores.new_full((scores.shape[0], missing), -math.inf)], dim=1)
            members = torch.cat([members, members.new_zeros(missing)])
        values.append(scores)
        experts.append(members.expand(group.numel(), k))
    out_values = torch.empty(n_tokens * m, k, dtype=y.dtype, device=y.device)
    out_experts = torch.empty(n_tokens * m, k, dtype=torch.long, device=y.device)
    out_values[order] = torch.cat(values)
    out_experts[order] = torch.cat(experts)
    return out_values.view(n_tokens, m * k), out_experts.view(n_tokens, m * k), scored


def _score_above(index, y, pairs, theta):
    """Every member of cluster c for every token t with pairs[t, c], keeping only scores above theta[t]:
    (tokens, values, experts) of those, (R,) each, and the number of dot products."""
    counts = pairs.sum(dim=0).tolist()
    grouped = torch.nonzero(pairs.T).select(1, 1)  # token indices grouped by cluster
    thresholds = theta.index_select(0, grouped).unsqueeze(1)
    tokens, values, experts, scored = [], [], [], 0
    for c, (group, above) in enumerate(zip(grouped.split(counts), thresholds.split(counts))):
        if group.numel() == 0:
            continue
        scores = y.index_select(0, group) @ index.member_vectors[c].T  # (tokens of c, n_c)
        scored += scores.numel()
        rows, cols = torch.nonzero(scores > above, as_tuple=True)
        if rows.numel():
            tokens.append(group[rows])
            values.append(scores[rows, cols])
            experts.append(index.members[c][cols])
    if not tokens:
        return y.new_zeros(0, dtype=torch.long), y.new_zeros(0), y.new_zeros(0, dtype=torch.long), scored
    return torch.cat(tokens), torch.cat(values), torch.cat(experts), scored


def _append_per_token(values, experts, tokens, extra_values, extra_experts):
    """(T, w) tables with each token's extra entries (given as flat (token, value, expert) lists) appended as
    columns, padded with -inf."""
    n_tokens = values.shape[0]
    counts = torch.bincount(tokens, minlength=n_tokens)
    order = torch.argsort(tokens, stable=True)
    sorted_tokens = tokens[order]
    column = torch.arange(tokens.numel(), device=tokens.device) - (torch.cumsum(counts, 0) - counts)[sorted_tokens]
    width = int(counts.max())
    more_values = values.new_full((n_tokens, width), -math.inf)
    more_experts = experts.new_zeros(n_tokens, width)
    more_values[sorted_tokens, column] = extra_values[order]
    more_experts[sorted_tokens, column] = extra_experts[order]
    return torch.cat([values, more_values], dim=1), torch.cat([experts, more_experts], dim=1)


def searches(index, n_tokens):
    """Whether `search` uses the index for a block of n_tokens tokens; it scores smaller blocks exhaustively."""
    return index.n_clusters > 1 and n_tokens >= max(1, MIN_TOKENS_PER_CLUSTER * index.n_clusters)


def _exhaustive(index, y, k):
    values, indices = torch.topk(y @ index.vectors.T, k, dim=1, sorted=False)
    return SearchResult(values, indices, y.shape[0] * index.n_experts)


def search(index, y, k, mode="exact", sigmas=DEFAULT_SIGMAS):
    """The k largest y . P_j per token of y (T, d) (P = index.vectors), as a SearchResult.

    mode "exact": the same experts as exhaustive scoring, up to ties (scores equal within float rounding).
    "approximate": the bound's deviation term ||y|| r is replaced by sigmas * ||y|| r / sqrt(d), which is
    `sigmas` standard deviations of y . v for a v of norm r in a direction independent of y; a top-k expert is
    missed only where a member's deviation is that well aligned with the token.
    Blocks too small to gain from the index (fewer than MIN_TOKENS_PER_CLUSTER tokens per cluster) and blocks
    where most pairs survive are scored exhaustively, which is exact.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}.")
    n_tokens, d = y.shape
    y = y.to(index.vectors.dtype)
    k = min(k, index.n_experts)
    n_clusters = index.n_clusters
    if not searches(index, n_tokens):
        return _exhaustive(index, y, k)
    centroid_scores = y @ index.centroids.T  # (T, C)

    # 1. Each token's nearest clusters by centroid score, as few as always hold k experts.
    nearest = torch.topk(centroid_scores, _min_clusters_for(index, k), dim=1, sorted=False).indices
    values, experts, scored = _score_probes(index, y, nearest, k)

    # 2. theta = the k-th best score found is a lower bound of the token's k-th best; a cluster whose bound is
    # below it cannot hold a top-k expert. The others are scored, keeping only scores above theta.
    theta = torch.topk(values, k, dim=1, sorted=False).values.min(dim=1).values
    norms = torch.linalg.vector_norm(y, dim=1)
    margin = ROUNDING_UNITS * d * torch.finfo(y.dtype).eps / 2 * norms * index.max_norm
    scale = 1.0 if mode == "exact" else min(1.0, sigmas / math.sqrt(d))
    bound = centroid_scores + (scale * norms).unsqueeze(1) * index.radii
    survivors = bound >= (theta - margin).unsqueeze(1)
    survivors[torch.arange(n_tokens, device=y.device).unsqueeze(1), nearest] = False  # scored already
    if survivors.sum() > EXHAUSTIVE_ABOVE * n_tokens * n_clusters:
        return _exhaustive(index, y, k)
    tokens, more_values, more_experts, more_scored = _score_above(index, y, survivors, theta)
    if tokens.numel():
        values, experts = _append_per_token(values, experts, tokens, more_values, more_experts)
    best, slots = torch.topk(values, k, dim=1, sorted=False)
    return SearchResult(best, experts.gather(1, slots), scored + more_scored)


def check_score_type(score_type, binding="score_type"):
    if score_type not in SCORE_TYPES:
        raise ValueError(f"{binding}={score_type!r}: sublinear scoring needs a score type that ranks experts by "
                         f"x . P, one of {SCORE_TYPES}.")


def search_tokens(x, score_type="original", input_mean=None):
    """(tokens, searched): the (centred) float tokens (M, d) the score type sees, and what the index searches.
    "original" searches the tokens minus their mean: its prepared vectors have zero mean, so the dot products
    are the same (up to rounding) and the smaller norm makes the bound tighter."""
    d = x.shape[-1]
    dtype = torch.promote_types(x.dtype, torch.float32)
    tokens = x.reshape(-1, d).to(dtype)
    if input_mean is not None:
        if tuple(input_mean.shape) != (d,):
            raise ValueError(f"input_mean must have shape ({d},), got {tuple(input_mean.shape)}.")
        tokens = tokens - input_mean.to(dtype)
    searched = tokens - tokens.mean(dim=1, keepdim=True) if score_type == "original" else tokens
    return tokens, searched


def topk_routing(index, x, k, score_type="original", scaling_scores=True, input_mean=None, mode="exact",
                 sigmas=DEFAULT_SIGMAS):
    """(indices, weights), both (..., min(k, N)), for tokens x (..., d): the top-k experts of the router whose
    prepared vectors the index holds (`routing.prepare_router_vectors(g, score_type)`) and their renormalised
    weights, softmax over the kept scores (see the module docstring for the eps of routing.topk_weights).
    input_mean: centring, as routing.router_scores. No autograd: an inference path."""
    check_score_type(score_type)
    lead = x.shape[:-1]
    with torch.no_grad():
        tokens, searched = search_tokens(x, score_type, input_mean)
        found = search(index, searched, k, mode, sigmas)
        scores = found.values.to(torch.promote_types(found.values.dtype, torch.float32))
        factor = routing.SCORE_TYPES[score_type].token_factor
        if factor is not None:
            scores = scores * factor(tokens)
        if scaling_scores:
            scores = scores * math.sqrt(1.0 / x.shape[-1])
        weights = torch.softmax(scores, dim=-1)
    kept = found.indices.shape[-1]
    return found.indices.reshape(*lead, kept), weights.reshape(*lead, kept)
