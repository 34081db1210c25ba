"""PHATGOOSE per-token routing among N LoRA experts, as pure functions.

For one linear layer with token activations x (..., d_in):
  1. score_i  = <standardise(x), standardise(g_i)> * sqrt(1/d_in)        ("original" score type; the others
     are in the SCORE_TYPES table)
     or, with centring (beyond the paper, `input_mean` mu given):
     score_i  = <standardise(x - mu), standardise(g_i)> * sqrt(1/d_in)
     where mu (d_in) is the mean token activation of this layer measured on calibration data. Only the
     scores see x - mu; the experts still take x.
  2. p        = softmax over the N experts                               ("smear" router type)
  3. keep the k largest p per token, optionally renormalised to sum to one
  4. dY       = sum_{j in top-k} p_j * (x @ layer1_j @ layer2_j) * scale
The caller adds dY to the frozen linear output x @ W^T (+ b).

Shapes: g (N, d_in), layer1 (N, d_in, r), layer2 (N, r, d_out). Leading dims of x are kept everywhere
(probabilities are (..., N), top-k tensors (..., k), dY (..., d_out)).

Speed notes (measured by benchmarks/routing.py):
  * Only router-side work is precomputed (`prepare_router_vectors`), once per checkpoint load.
  * Because standardised router vectors have zero mean, <standardise(x), g^_i> = <x, g^_i> / std(x): the
    standardised x is never materialised, and x @ g^T can share one GEMM with the base weight
    (`fuse_linear_and_router` / `linear_and_router_scores`).
  * `routed_lora` only computes the chosen (token, expert) pairs (`_grouped_lora`): pairs are sorted by expert
    once and their rows gathered into a reused buffer; each low-rank product is one torch.bmm over the experts padded
    to a common row count, or on one thread where the padding would cost more, one matrix product per expert; the
    result is index-added into the output. What remains is mostly memory traffic and per-call
    overhead (the gathered rows and the (pairs x d_out) product are each written once and read once), not FLOPs.
  * On cores shared with other work, SERIAL_SMALL_OPS keeps everything but the router product on one thread.
`dense_reference` is the slow, obviously-correct version that the tests compare against.
"""

import contextlib
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ROUTER_TYPES = ("smear", "top1")
LAYER_NORM_EPS = 1e-5  # eps of the affine-free LayerNorm of the "original" score
COSINE_EPS = 1e-6  # eps of the L2 normalisation of the "cosine" score
# Rows of the fused [W | g^] weight are padded to a multiple of this: an odd column count (e.g. 768 + 166)
# makes the CPU GEMM noticeably slower than a padded one (measured: 1.60x vs 1.24x base at N=166).
FUSED_ROWS_MULTIPLE = 16
# dtypes F.grouped_mm takes (others, e.g. float64, use a loop over the experts; see _grouped_mm).
GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# In place, routed_lora pads each expert's chosen pairs to a common capacity (`_padded_into`): the largest count, but
# at most max(this x pairs / N, MIN_PADDED_CAPACITY) (skewed routing: a busier expert's other rows go unpadded).
PADDED_ROWS_PER_PAIR = 2.0
MIN_PADDED_CAPACITY = 16
# ... on one intra-op thread only while the padded layout has at most (pairs + this x N) rows: there, one matrix
# product per expert and product is cheaper than more padding (measured: T=2048, d=768, N=166 unpadded 10.2 ms,
# padded 12.9 ms; T=256, d=512, N=166 unpadded 3.1 ms, padded 2.1 ms).
ONE_THREAD_PADDING_ROWS = 10
# ... and with at most this many pairs per expert (a decoder step), each pair's factors are gathered instead
# (`_gathered_weights_into`): measured for 8 tokens, d=512, N=166, one thread, 0.21 ms against 0.84 ms unpadded and
# 1.2 ms padded (which read every expert's factors); for 32 tokens 0.73 ms against ~1.0 ms; for 256 tokens 6.5 ms
# against 2.3 ms padded.
GATHERED_WEIGHTS_MAX_PAIRS_PER_EXPERT = 0.5
# Largest gather buffer routed_lora keeps between calls (per thread and dtype/device); larger ones are allocated anew.
SCRATCH_MAX_BYTES = 64 * 2**20
# routed_lora computes every expert densely when N <= this * k (measured at k=2, T=2048, CPU: clearly faster
# than the grouped path for N <= 4, on par at N = 8).
DENSE_MAX_EXPERTS_PER_K = 4
_SCRATCH = threading.local()
# On two cores shared with other work, every multi-threaded operation is a parallel region that waits for a
# descheduled thread (5-7 ms a region was measured here, against ~10 us on idle cores). True: on the CPU, the routed
# path's own operations (token factors, softmax, top-k, sorting, gathering, the low-rank products, the scatter) run
# on one intra-op thread, only the router product (a GEMM that grows with the host linear) on all of them, and
# routed_lora takes its one-thread path. Measured at N=1 and 166 on two cores (the addons layer / the base linear,
# interleaved): shared with other work, 1.21-1.26x and 2.23-2.50x with True, 2.57-3.28x and 3.55-4.63x without
# (before the padded layout; with it, still 3.0x and 7.4x); idle, 1.42x and 2.77x with True, 1.30x and 2.46x
# without. The project's default of one intra-op thread (exp_launch/setup_environment_variable.sh) makes it moot.
SERIAL_SMALL_OPS = False


def standardize(v, eps=LAYER_NORM_EPS):
    """(v - mean) / sqrt(biased var + eps) over the last dim: LayerNorm without affine parameters."""
    var, mean = torch.var_mean(v, dim=-1, correction=0, keepdim=True)
    return (v - mean) * torch.rsqrt(var + eps)


# ----- score types -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoreType:
    """How one router score type scores tokens x (..., d_in) against router vectors g (N, d_in).

    Fast path: P = prepare(g) once per checkpoint load, then per token
        scores = finish(x @ P^T, temperature) * token_factor(x)     [* sqrt(1/d_in) if scaling_scores]
    x @ P^T can come from a GEMM fused with the host linear, and centring (x - mu) corrects it by mu @ P^T.
    token_factor(x): (..., 1) float32, or None for 1. finish(scores, temperature): or None for no change.
    reference(x, g, temperature, router_weights): the unscaled scores the slow, obvious way (dense_reference).
    learned_router_weights: the Router learns a (d_in,) vector (init ones) that multiplies P elementwise.
    """

    prepare: Callable
    reference: Callable
    token_factor: Callable | None = None
    finish: Callable | None = None
    learned_router_weights: bool = False


def _unchanged(g):
    return g


def _l2_normalize(v):
    return F.normalize(v, p=2.0, dim=-1, eps=COSINE_EPS)


def _inverse_std(x):
    # 1 / std(x) from the first two moments: two cheap reductions instead of torch.var (slow on CPU)
    # or materialising x - mean. E[x^2] - E[x]^2 loses precision only when |mean| >> std.
    d_in = x.shape[-1]
    mean = x.mean(dim=-1, keepdim=True, dtype=torch.float32)
    mean_sq = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32).square() / d_in
    var = (mean_sq - mean * mean).clamp(min=0.0)
    return torch.rsqrt(var + LAYER_NORM_EPS)


def _inverse_norm(x):
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32)
    return 1.0 / norm.clamp(min=COSINE_EPS)


def _abs_over_temperature(scores, temperature):
    return (scores / temperature).abs()


def _original_reference(x, g, temperature, router_weights):
    d_in = x.shape[-1]
    return F.layer_norm(x, (d_in,), eps=LAYER_NORM_EPS) @ F.layer_norm(g, (d_in,), eps=LAYER_NORM_EPS).T


def _dot_reference(x, g, temperature, router_weights):
    return x @ g.T


def _cosine_reference(x, g, temperature, router_weights):
    return F.normalize(x, dim=-1, eps=COSINE_EPS) @ F.normalize(g, dim=-1, eps=COSINE_EPS).T


def _weighted_cosine_reference(x, g, temperature, router_weights):
    weights = 1.0 if router_weights is None else router_weights
    return F.normalize(x, dim=-1, eps=COSINE_EPS) @ (F.normalize(g, dim=-1, eps=COSINE_EPS) * weights).T


def _arrow_reference(x, g, temperature, router_weights):
    return torch.abs(x @ g.T / temperature)


SCORE_TYPES = {
    # The paper's score: both sides standardised (LayerNorm without affine parameters).
    "original": ScoreType(prepare=standardize, token_factor=_inverse_std, reference=_original_reference),
    "dot": ScoreType(prepare=_unchanged, reference=_dot_reference),
    "cosine": ScoreType(prepare=_l2_normalize, token_factor=_inverse_norm, reference=_cosine_reference),
    "weighted_cosine": ScoreType(prepare=_l2_normalize, token_factor=_inverse_norm,
                                 reference=_weighted_cosine_reference, learned_router_weights=True),
    # Arrow routing: |x . u| / temperature, u the top left singular vector of each expert's update.
    "arrow": ScoreType(prepare=_unchanged, finish=_abs_over_temperature, reference=_arrow_reference),
}


def get_score_type(score_type):
    """The SCORE_TYPES entry named score_type; a ValueError listing the names for any other value."""
    if not isinstance(score_type, str) or score_type not in SCORE_TYPES:
        raise ValueError(f"score_type must be one of {tuple(SCORE_TYPES)}, got {score_type!r}.")
    return SCORE_TYPES[score_type]


def prepare_router_vectors(g, score_type="original", router_weights=None):
    """Everything that depends only on the router vectors g (N, d_in); compute once per checkpoint load.

    Returns a (N, d_in) matrix P such that the raw scores are x @ P^T, corrected per token by `router_scores`
    (ScoreType.prepare, times router_weights (d_in,) for a score type with learned router weights).
    Differentiable, so the gate-training stage can call it every step instead.
    """
    spec = get_score_type(score_type)
    if g.dim() != 2:
        raise ValueError(f"router vectors must be (N, d_in), got shape {tuple(g.shape)}.")
    if router_weights is not None and not spec.learned_router_weights:
        raise ValueError(f"score_type {score_type!r} has no learned router weights.")
    prepared = spec.prepare(g)
    return prepared if router_weights is None else prepared * router_weights


def fuse_linear_and_router(weight, prepared):
    """[W ; P] stacked along output rows, (d_out + N + pad, d_in), so that one GEMM gives x W^T and x P^T.

    `weight` is an F.linear weight (d_out, d_in). Build it once next to `prepare_router_vectors` when W and
    the router are frozen (inference); `linear_and_router_scores` builds it on the fly otherwise.
    """
    d_out, d_in = weight.shape
    n_experts = prepared.shape[0]
    pad = -(d_out + n_experts) % FUSED_ROWS_MULTIPLE
    parts = [weight, prepared.to(weight.dtype)]
    if pad:
        parts.append(weight.new_zeros(pad, d_in))
    return torch.cat(parts, dim=0)


def linear_and_router_scores(x, weight, prepared, bias=None, fused_weight=None):
    """(x W^T + b, x P^T) from a single GEMM. Both outputs are strided views into one (..., d_out + N + pad)
    tensor. `fused_weight` is the output of `fuse_linear_and_router(weight, prepared)` if precomputed."""
    d_out = weight.shape[0]
    n_experts = prepared.shape[0]
    if fused_weight is None:
        fused_weight = fuse_linear_and_router(weight, prepared)
    fused_bias = None
    if bias is not None:
        fused_bias = torch.cat([bias, bias.new_zeros(fused_weight.shape[0] - d_out)])
    y = F.linear(x, fused_weight, fused_bias)
    return y[..., :d_out], y[..., d_out : d_out + n_experts]


def router_scores(x, prepared, score_type="original", scaling_scores=True, temperature=10.0, raw_scores=None,
                  input_mean=None):
    """Scores (..., N), float32 (float64 for float64 inputs), before the softmax.

    The score of `score_type` (SCORE_TYPES; `prepared` from prepare_router_vectors with the same score type), times
    sqrt(1/d_in) if scaling_scores. `raw_scores` = x @ prepared^T if already computed (fused GEMM).
    input_mean (d_in,): centring; every score is computed for x - input_mean instead of x (a precomputed
    `raw_scores` is corrected by input_mean @ prepared^T, so the fused GEMM still serves). None: no centring,
    and nothing is computed for it.
    """
    spec = get_score_type(score_type)
    d_in = x.shape[-1]
    if input_mean is not None:
        if tuple(input_mean.shape) != (d_in,):
            raise ValueError(f"input_mean must have shape ({d_in},) like the token activations' last dim, "
                             f"got {tuple(input_mean.shape)}.")
        dtype = torch.promote_types(torch.promote_types(x.dtype, input_mean.dtype), torch.float32)
        with _serial(x):
            if raw_scores is not None:
                raw_dtype = torch.promote_types(raw_scores.dtype, torch.float32)
                raw_scores = raw_scores.to(raw_dtype) - F.linear(input_mean.to(raw_dtype), prepared.to(raw_dtype))
            x = x.to(dtype) - input_mean.to(dtype)
    if raw_scores is None:  # the router product: 2*T*N*d FLOPs, on every intra-op thread
        dtype = torch.promote_types(x.dtype, prepared.dtype)
        raw_scores = F.linear(x.to(dtype), prepared.to(dtype))
    with _serial(x):
        scores = raw_scores.to(torch.promote_types(raw_scores.dtype, torch.float32))
        factor = None if spec.token_factor is None else spec.token_factor(x)
        if spec.finish is not None:
            scores = spec.finish(scores, temperature)
        if scaling_scores:
            factor = math.sqrt(1.0 / d_in) if factor is None else factor * math.sqrt(1.0 / d_in)
        if factor is not None:
            scores = scores * factor
    return scores


def probs_from_scores(scores, router_type="smear"):
    """Routing probabilities (..., N) from router scores: "smear" is the softmax over experts; "top1" the
    softmax with every entry but the argmax zeroed (not renormalised)."""
    if router_type not in ROUTER_TYPES:
        raise ValueError(f"router_type must be one of {ROUTER_TYPES}, got {router_type!r}.")
    with _serial(scores):
        probs = torch.softmax(scores, dim=-1)
        if router_type == "top1":
            top = probs.argmax(dim=-1, keepdim=True)
            probs = torch.zeros_like(probs).scatter(-1, top, probs.gather(-1, top))
    return probs


def router_probs(x, prepared, score_type="original", scaling_scores=True, router_type="smear", temperature=10.0,
                 raw_scores=None, input_mean=None):
    """Routing probabilities (..., N) for tokens x (..., d_in) and prepared router vectors (N, d_in):
    `probs_from_scores(router_scores(...))`."""
    if router_type not in ROUTER_TYPES:
        raise ValueError(f"router_type must be one of {ROUTER_TYPES}, got {router_type!r}.")
    scores = router_scores(x, prepared, score_type, scaling_scores, temperature, raw_scores, input_mean)
    return probs_from_scores(scores, router_type)


def topk_weights(probs, k, normalize_topk, eps=1e-6):
    """(indices, weights), both (..., min(k, N)): the k most probable experts per token and their
    probabilities, divided by (their sum + eps) if normalize_topk."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}.")
    k = min(k, probs.shape[-1])
    with _serial(probs):
        # Unsorted: the slot order is irrelevant to the weighted sum, and sorting costs time.
        weights, indices = torch.topk(probs, k, dim=-1, sorted=False)
        if normalize_topk:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + eps)
    return indices, weights


def routed_lora(x, layer1, layer2, indices, weights, scale, out=None):
    """dY (..., d_out) = sum_j weights[..., j] * (x @ layer1[e_j] @ layer2[e_j]) * scale, e_j = indices[..., j].

    Computes only the chosen (token, expert) pairs (`_grouped_lora`), unless there are so few experts that
    computing all of them is cheaper (`_dense_lora`). Differentiable w.r.t. x, layer1, layer2 and weights.
    Computes in the promoted dtype of x and the LoRA factors (so bf16 activations with fp32 experts run in fp32,
    like LoRALinear) and returns x's dtype. If `out` (..., d_out) is given, returns out + dY instead; when
    autograd is not recording, `out` itself is updated in place (saves a zero-fill and an add).
    """
    with _serial(x):
        return _routed_lora(x, layer1, layer2, indices, weights, scale, out)


def _routed_lora(x, layer1, layer2, indices, weights, scale, out):
    lead = x.shape[:-1]
    d_in = x.shape[-1]
    n_experts, _, d_out = layer2.shape
    if layer1.shape[0] != n_experts or layer1.shape[1] != d_in or layer1.shape[2] != layer2.shape[1]:
        raise ValueError(f"layer1 {tuple(layer1.shape)} / layer2 {tuple(layer2.shape)} / d_in {d_in} mismatch.")
    compute_dtype = torch.promote_types(torch.promote_types(x.dtype, layer1.dtype), layer2.dtype)
    xf = x.reshape(-1, d_in).to(compute_dtype)
    k = indices.shape[-1]
    # The scale is folded into the per-pair weights: they multiply the (pairs x r) intermediate, not dY.
    pair_weights = weights.reshape(-1, k).to(compute_dtype) * scale
    inplace = not (torch.is_grad_enabled()
                   and any(t.requires_grad for t in (x, layer1, layer2, weights, out) if t is not None))
    acc = None
    if inplace:
        if out is None:
            acc = torch.zeros(xf.shape[0], d_out, dtype=compute_dtype, device=x.device)
        else:
            acc = out.reshape(-1, d_out).to(compute_dtype)
    # Few experts: computing all of them densely costs at most DENSE_MAX_EXPERTS_PER_K x the chosen pairs' FLOPs,
    # in two plain GEMMs with no sorting, gathering or scattering (which cost more than those FLOPs here).
    lora = _dense_lora if n_experts <= DENSE_MAX_EXPERTS_PER_K * k else _grouped_lora
    result = lora(xf, layer1.to(compute_dtype), layer2.to(compute_dtype), indices.reshape(-1, k), pair_weights, acc)
    if not inplace:
        delta = result.to(x.dtype).reshape(*lead, d_out)
        return delta if out is None else out + delta.to(out.dtype)
    if out is None:
        return result.to(x.dtype).reshape(*lead, d_out)
    if result.data_ptr() != out.data_ptr():  # reshape or dtype change made a copy
        out.copy_(result.reshape(out.shape))
    return out


def _dense_lora(xf, layer1, layer2, indices, pair_weights, acc):
    """Every expert on every token, weighted by a (T, N) gate that is zero outside the chosen pairs.
    Adds into acc (T, d_out) in place and returns it, or returns dY (autograd) if acc is None."""
    n_experts, d_in, rank = layer1.shape
    n_tokens = xf.shape[0]
    gate = torch.zeros(n_tokens, n_experts, dtype=xf.dtype, device=xf.device).scatter_add(1, indices, pair_weights)
    hidden = xf @ layer1.transpose(0, 1).reshape(d_in, n_experts * rank)  # (T, N*r); a view when N == 1
    hidden = (hidden.view(n_tokens, n_experts, rank) * gate.unsqueeze(2)).view(n_tokens, n_experts * rank)
    flat_layer2 = layer2.reshape(n_experts * rank, -1)
    if acc is None:
        return hidden @ flat_layer2
    return acc.addmm_(hidden, flat_layer2)


def _fits_grouped_mm(t):
    """Whether F.grouped_mm takes t (rows, e) or (N, rows, e) as an operand, and its transpose for the backward: a
    dtype of GROUPED_MM_DTYPES, rows contiguous and each 16 bytes aligned (so e * itemsize a multiple of 16)."""
    return (t.dtype in GROUPED_MM_DTYPES and t.stride(-1) == 1 and t.stride(-2) == t.shape[-1]
            and (t.shape[-1] * t.dtype.itemsize) % 16 == 0 and t.data_ptr() % 16 == 0)


def _grouped_mm(a, b, ends):
    """Row groups of a (rows, d) times b (N, d, e): group i (rows ends[i-1]..ends[i]) times b[i], as (rows, e).

    F.grouped_mm (one call; on CPU a loop of matrix products in C++) where it takes the operands (`_fits_grouped_mm`:
    e.g. fp32 with d and e multiples of 4); a Python loop over the non-empty groups otherwise (float64, odd widths).
    Differentiable either way.
    """
    if a.dtype == b.dtype and _fits_grouped_mm(a) and _fits_grouped_mm(b):
        return F.grouped_mm(a, b, offs=ends)
    bounds = [0] + ends.tolist()
    parts = [a[start:stop] @ b[i] for i, (start, stop) in enumerate(zip(bounds, bounds[1:])) if stop > start]
    return torch.cat(parts) if parts else a.new_zeros(0, b.shape[2])


def _scratch(name, rows, cols, dtype, device):
    """An uninitialised (rows, cols) buffer `name`, reused across calls in this thread (in-place path only: what is
    written there never leaves the call).

    A fresh tensor of a few MB is often a fresh mapping whose pages the kernel maps on first touch (glibc serves
    PyTorch's aligned allocations of that size with mmap), and on the machines the benchmarks run on that costs
    more than the copy into it: a 2048 x 2 x 768 fp32 gather took ~9 ms with its ~3000 page faults, ~2.5 ms without.
    Whether an allocation faults depends on what the process allocated before, so the cost came and went with the
    allocation history. Buffers above SCRATCH_MAX_BYTES are not kept.
    """
    numel = rows * cols
    if numel * dtype.itemsize > SCRATCH_MAX_BYTES:
        return torch.empty(rows, cols, dtype=dtype, device=device)
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    # Inference tensors cannot be written outside inference mode: one buffer per mode.
    key = (name, dtype, device, torch.is_inference_mode_enabled())
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = buffers[key] = torch.empty(numel, dtype=dtype, device=device)
    return buffer[:numel].view(rows, cols)


@contextlib.contextmanager
def _intra_op_threads(n):
    """Runs the block with n intra-op threads (torch.set_num_threads), restoring the count after."""
    threads = torch.get_num_threads()
    if threads == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _serial(t):
    """One intra-op thread for the block when t is on the CPU and SERIAL_SMALL_OPS; nothing otherwise."""
    if SERIAL_SMALL_OPS and t.device.type == "cpu":
        return _intra_op_threads(1)
    return contextlib.nullcontext()


def _grouped_lora(xf, layer1, layer2, indices, pair_weights, acc):
    """Only the chosen (token, expert) pairs, sorted by expert once and their x rows gathered in that order; the
    (pairs, d_out) result is index-added into dY by token. Same acc convention as _dense_lora.

    With autograd: both low-rank products grouped (F.grouped_mm, one matrix product per expert, no padding). In
    place, one of two layouts (`_padded_into` or `_grouped_into`): each expert's rows padded to a common capacity so
    that each product is one torch.bmm, or unpadded with one matrix product per expert. The padded one parallelises
    over the experts and has no per-expert call, so it is taken with more than one intra-op thread, and on one thread
    when its padding costs less than those calls (few pairs per expert, e.g. decoder tokens). Fewer pairs than
    experts (a generation step) skip both: `_gathered_weights_into`.

    Measured at N=166, T=2048, k=2, d=768, r=16, CPU fp32 (interleaved): the products alone on one thread (thread
    CPU time), unpadded 0.43-0.59x the base linear, against 0.54-0.79x for the previous design (runs of experts padded
    to a common row count, one torch.bmm per run of up to 512 rows, ~12 runs) and ~0.2x more padded; the whole routed
    layer on two idle cores, padded 2.30-2.41x the base linear, unpadded 2.74x, the previous design 2.31-2.46x.
    """
    n_experts, d_in, _ = layer1.shape
    d_out = layer2.shape[2]
    k = indices.shape[1]
    flat_experts = indices.reshape(-1)
    n_pairs = flat_experts.numel()
    if n_pairs == 0:
        return acc if acc is not None else xf.new_zeros(xf.shape[0], d_out)
    if acc is not None and n_pairs <= GATHERED_WEIGHTS_MAX_PAIRS_PER_EXPERT * n_experts:
        return _gathered_weights_into(acc, xf, layer1, layer2, flat_experts, pair_weights)
    order = torch.argsort(flat_experts, stable=True)  # stable: each expert's tokens stay in ascending order
    counts = torch.bincount(flat_experts, minlength=n_experts)
    tokens = torch.div(order, k, rounding_mode="floor")
    sorted_weights = pair_weights.reshape(-1).index_select(0, order)
    if acc is None:
        ends = torch.cumsum(counts, 0, dtype=torch.int32)
        rows = xf.index_select(0, tokens)
        hidden = _grouped_mm(rows, layer1, ends) * sorted_weights.unsqueeze(1)
        return xf.new_zeros(xf.shape[0], d_out).index_add(0, tokens, _grouped_mm(hidden, layer2, ends))
    largest = int(counts.max())
    capacity = min(largest, max(math.ceil(PADDED_ROWS_PER_PAIR * n_pairs / n_experts), MIN_PADDED_CAPACITY))
    if torch.get_num_threads() > 1 or (
            capacity == largest and n_experts * capacity <= n_pairs + ONE_THREAD_PADDING_ROWS * n_experts):
        return _padded_into(acc, xf, layer1, layer2, tokens, sorted_weights, flat_experts.index_select(0, order),
                            counts, capacity)
    return _grouped_into(acc, xf, layer1, layer2, tokens, sorted_weights, torch.cumsum(counts, 0, dtype=torch.int32))


def _gathered_weights_into(acc, xf, layer1, layer2, flat_experts, pair_weights):
    """Few pairs for many experts (a decoder step: 8 tokens x 2 pairs for 166 experts): each pair's own factors
    gathered, both products one torch.bmm over the pairs; no sorting, and only the chosen experts' weights are read.
    In place into acc."""
    k = flat_experts.numel() // xf.shape[0]
    tokens = torch.arange(xf.shape[0], device=xf.device).repeat_interleave(k)
    hidden = torch.bmm(xf.index_select(0, tokens).unsqueeze(1), layer1.index_select(0, flat_experts))
    hidden.mul_(pair_weights.reshape(-1, 1, 1))
    return acc.index_add_(0, tokens, torch.bmm(hidden, layer2.index_select(0, flat_experts)).squeeze(1))


def _grouped_into(acc, xf, layer1, layer2, tokens, weights, ends):
    """acc[tokens[p]] += weights[p] * (xf[tokens[p]] @ layer1[e] @ layer2[e]) for the pairs p of group e (pairs
    ends[e-1]..ends[e], sorted by expert), in place, one matrix product per expert and product. The gathered rows
    and the result live in per-thread buffers (`_scratch`); the second product writes into its buffer expert by
    expert (F.grouped_mm has no out=; the loop costs the same as its own, measured)."""
    n_pairs, d_in, d_out = tokens.numel(), xf.shape[1], layer2.shape[2]
    rows = torch.index_select(xf, 0, tokens, out=_scratch("rows", n_pairs, d_in, xf.dtype, xf.device))
    hidden = _grouped_mm(rows, layer1, ends).mul_(weights.unsqueeze(1))
    delta = _scratch("delta", n_pairs, d_out, xf.dtype, xf.device)
    bounds = [0] + ends.tolist()
    for expert, (start, stop) in enumerate(zip(bounds, bounds[1:])):
        if stop > start:
            torch.mm(hidden[start:stop], layer2[expert], out=delta[start:stop])
    return acc.index_add_(0, tokens, delta)


def _padded_into(acc, xf, layer1, layer2, tokens, weights, sorted_experts, counts, capacity):
    """The pairs (sorted by expert: tokens, weights, sorted_experts; counts per expert) in an (N, capacity) layout,
    so that each low-rank product is one torch.bmm, parallel over the experts; padding slots read token 0 with weight
    0 and add exact zeros. Rows of an expert beyond the capacity (`_grouped_lora` bounds it for skewed routing) go
    through `_grouped_into`. In place into acc."""
    n_experts, d_in, _ = layer1.shape
    d_out = layer2.shape[2]
    n_pairs = tokens.numel()
    rank = torch.arange(n_pairs, device=xf.device) - (torch.cumsum(counts, 0) - counts).index_select(0, sorted_experts)
    slots = sorted_experts * capacity + rank
    overflow = int(counts.max()) > capacity
    padded_tokens, padded_weights = tokens, weights
    if overflow:
        kept = rank < capacity
        slots, padded_tokens, padded_weights = slots[kept], tokens[kept], weights[kept]
    n_slots = n_experts * capacity
    slot_tokens = torch.zeros(n_slots, dtype=tokens.dtype, device=xf.device).index_copy_(0, slots, padded_tokens)
    slot_weights = xf.new_zeros(n_slots).index_copy_(0, slots, padded_weights)
    rows = torch.index_select(xf, 0, slot_tokens, out=_scratch("rows", n_slots, d_in, xf.dtype, xf.device))
    hidden = torch.bmm(rows.view(n_experts, capacity, d_in), layer1).mul_(slot_weights.view(n_experts, capacity, 1))
    delta = _scratch("delta", n_slots, d_out, xf.dtype, xf.device).view(n_experts, capacity, d_out)
    acc.index_add_(0, slot_tokens, torch.bmm(hidden, layer2, out=delta).view(n_slots, d_out))
    if overflow:
        rest = ~kept
        ends = torch.cumsum((counts - capacity).clamp_(min=0), 0, dtype=torch.int32)
        _grouped_into(acc, xf, layer1, layer2, tokens[rest], weights[rest], ends)
    return acc


def route_and_apply(x, prepared, layer1, layer2, k, normalize_topk, scale, score_type="original",
                    scaling_scores=True, router_type="smear", temperature=10.0, raw_scores=None, out=None,
                    input_mean=None):
    """router_probs + topk_weights + routed_lora. Returns (dY, probs); dY is out + dY if `out` is given
    (see routed_lora), probs (..., N) can be recorded for analysis. input_mean: centring of the scores only."""
    probs = router_probs(x, prepared, score_type, scaling_scores, router_type, temperature, raw_scores, input_mean)
    indices, weights = topk_weights(probs, k, normalize_topk)
    return routed_lora(x, layer1, layer2, indices, weights, scale, out=out), probs


def dense_reference(x, g, layer1, layer2, k, normalize_topk, scale, score_type="original", scaling_scores=True,
                    router_type="smear", temperature=10.0, input_mean=None, router_weights=None):
    """REFERENCE ONLY (tests): steps 1-5 done the slow, obvious way, every expert on every token.
    input_mean: the scores are those of x - input_mean (centring); the experts still see x.
    router_weights: the learned (d_in,) weights of a score type that has them (None: ones)."""
    d_in = x.shape[-1]
    n_experts = g.shape[0]
    s = x if input_mean is None else x - input_mean
    scores = get_score_type(score_type).reference(s, g, temperature, router_weights)
    if scaling_scores:
        scores = scores * math.sqrt(1.0 / d_in)
    probs = torch.softmax(scores, dim=-1)
    if router_type == "top1":
        probs = probs * F.one_hot(probs.argmax(dim=-1), n_experts).to(probs.dtype)
    kept, chosen = torch.topk(probs, min(k, n_experts), dim=-1)
    if normalize_topk:
        kept = kept / (kept.sum(dim=-1, keepdim=True) + 1e-6)
    gate = torch.zeros_like(probs).scatter(-1, chosen, kept)  # (..., N), zero outside the top k
    every_expert = torch.einsum("...d,ndr,nro->...no", x, layer1, layer2) * scale  # (..., N, d_out)
    return torch.einsum("...n,...no->...o", gate, every_expert)
