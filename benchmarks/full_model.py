"""Forward time of a whole routed T5 relative to the same model without experts, CPU fp32.

Run: .venv/bin/python benchmarks/full_model.py [--size small|base] [--repeats 5] [--threads 2]

A T5 built offline from a config with random weights (`--size small`, the default: benchmarks/common.py's
T5-small-sized T5 v1.1 shape, d_model 512, 6+6 layers, 8 heads of 64, d_ff 1024, gated-GELU, vocabulary 32128, head
tied to the embedding; `--size base`: the same with d_model 768, 12+12 layers, 12 heads, d_ff 2048), wrapped in the project's Model through the gin files an A2 evaluation uses
(colm/models/tiny/t5.gin for the Model and tokenizer, colm/models/tiny/moe_lora_rank16_a2.gin for the build: token
routing at every encoder and decoder linear, cross-attention k/v included, rank-16 experts), top-2 with
renormalisation (FFNExperts.topk_value=2, normalize_topk=True) and frozen parameters (Model.trainable_params="none",
as eval.gin). Experts are added with `extend_moe`, N in (1, 36, 166) on the same model one after the other; the
router vectors and both LoRA factors of every expert are random. One teacher-forced forward: batch 8 x 256 encoder
tokens and 32 decoder tokens, under torch.inference_mode.

For each N, interleaved, repeat after repeat (base first, the others in a shuffled order; each ratio is a median
over repeats of the same-repeat base time):
  base            the same model with every addon switched off (the frozen T5)
  routed          the model as the project runs it (ExposeHidden, Router, FFNExperts addons; colm/moma/routing.py)
  routed-serial   (only with more than one thread) the same with routing.SERIAL_SMALL_OPS = True: every routed
                  operation but the router product on one thread (for cores shared with other work)
  original-style  the same routers and experts computed as the original did, written from its description (as
                  benchmarks/routing.py's variant): router vectors and experts stacked from per-expert tensors every
                  forward, LayerNorm on both sides, softmax, top-k, a dense (tokens x N) gate, then for every expert
                  the tokens routed to it picked by a mask, its LoRA, and an index_add back
floor = FLOPs of (base + every router product + the k chosen LoRA products per token) / FLOPs of base, the base
counted by torch.utils.flop_counter (linears, attention products, head), the rest from each routed linear's
tokens. With --size small on two idle cores one run takes about two minutes (longer when the cores are shared);
--size base about five times that.
"""

import argparse
import contextlib
import functools
import math
import os
import random
import statistics
import sys

import gin
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from transformers import T5ForConditionalGeneration

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
from common import cpu_name, interleaved_times, t5_small_config  # noqa: E402  (benchmarks/common.py)

from colm import configurables, registry  # noqa: E402,F401  (configurables: the gin names the gin files use)
from colm.ginparse import parse_gin  # noqa: E402
from colm.moma import routing  # noqa: E402
from colm.moma.moe import extend_moe  # noqa: E402

SIZES = {"small": {}, "base": dict(d_model=768, d_ff=2048, num_layers=12, num_decoder_layers=12, num_heads=12)}
BATCH, ENCODER_TOKENS, DECODER_TOKENS = 8, 256, 32
TOP_K, RANK = 2, 16
EXPERT_COUNTS = (1, 36, 166)
GIN_FILES = ["colm/models/tiny/t5.gin", "colm/models/tiny/moe_lora_rank16_a2.gin"]


@gin.configurable
def benchmark_t5(size="small"):
    """The HF model: a T5 of the given size from a config, random weights, no download."""
    torch.manual_seed(0)
    config = t5_small_config()
    for name, value in SIZES[size].items():
        setattr(config, name, value)
    return T5ForConditionalGeneration(config)


def build_model(size):
    parse_gin(GIN_FILES, ["M/MODEL/Model.torch_model = @benchmark_t5()", f"benchmark_t5.size = {size!r}",
                          "M/MODEL/Model.trainable_params = 'none'", "M/MODEL/Model.device = 'cpu'",
                          f"M/MODEL/FFNExperts.topk_value = {TOP_K}", "M/MODEL/FFNExperts.normalize_topk = True",
                          f"M/MODEL/FFNExperts.d_bottleneck = {RANK}"])
    model = registry.get_object("M/MODEL")
    model.eval()
    return model


def grow_to(model, n_experts, generator):
    """extend_moe up to n_experts, then random router vectors and LoRA factors for every expert."""
    extend_moe(model, num_new_experts=n_experts - len(next(iter(model.addons["router"].values())).link))
    with torch.no_grad():
        for router in model.addons["router"].values():
            router.expert_embeddings.copy_(torch.randn(router.expert_embeddings.shape, generator=generator))
        for experts in model.addons["expert_lora"].values():
            experts.layer1.copy_(torch.randn(experts.layer1.shape, generator=generator) * 0.05)
            experts.layer2.copy_(torch.randn(experts.layer2.shape, generator=generator) * 0.05)


def hosts(model):
    return [module for module in model.torch_model.modules() if hasattr(module, "_addons")]


@contextlib.contextmanager
def addons_off(model):
    """The frozen T5 alone: every host runs no addon (its hooks iterate over empty orders)."""
    saved = [(host, host._addon_pre_order, host._addon_post_order) for host in hosts(model)]
    for host, _, _ in saved:
        host._addon_pre_order, host._addon_post_order = [], []
    try:
        yield
    finally:
        for host, pre, post in saved:
            host._addon_pre_order, host._addon_post_order = pre, post


def original_router_pre_forward(router, args, kwargs):
    hidden = router.global_hidden_dict[router.read_key]
    d = hidden.shape[-1]
    g = torch.stack(list(router.expert_embeddings))  # the original held one tensor per expert
    scores = F.layer_norm(hidden, (d,)) @ F.layer_norm(g, (d,)).T * math.sqrt(1.0 / d)
    router.global_hidden_dict[router.write_key] = torch.softmax(scores, dim=-1)


def original_experts_post_forward(experts, args, kwargs, output):
    x = args[0] if args else kwargs["input"]
    probs = experts.global_hidden_dict[experts.read_key]
    x2, p2 = x.reshape(-1, x.shape[-1]), probs.reshape(-1, probs.shape[-1])
    layer1, layer2 = torch.stack(list(experts.layer1)), torch.stack(list(experts.layer2))
    top_p, top_i = torch.topk(p2, min(experts.topk_value, p2.shape[-1]), dim=-1)
    top_p = top_p / (top_p.sum(dim=-1, keepdim=True) + experts.epsilon)
    gate = torch.zeros_like(p2).scatter(1, top_i, top_p)  # (tokens, N), zero outside the top k
    moe = torch.zeros(x2.shape[0], output.shape[-1], dtype=output.dtype)
    for i in range(p2.shape[-1]):
        mask = gate[:, i] > 0
        rows = mask.nonzero().squeeze(1)
        expert_out = (x2[mask] @ layer1[i]) @ layer2[i] * (gate[mask, i].unsqueeze(1) * experts.scale)
        moe.index_add_(0, rows, expert_out)
    return output + moe.view(output.shape)


@contextlib.contextmanager
def original_style(model):
    """Every router and expert addon computes as the original did (instance methods shadow the class ones)."""
    routers, experts = model.addons["router"].values(), model.addons["expert_lora"].values()
    for router in routers:
        router.pre_forward = lambda args, kwargs, router=router: original_router_pre_forward(router, args, kwargs)
    for addon in experts:
        addon.post_forward = lambda args, kwargs, output, addon=addon: original_experts_post_forward(
            addon, args, kwargs, output)
    try:
        yield
    finally:
        for addon in [*routers, *experts]:
            vars(addon).pop("pre_forward", None)
            vars(addon).pop("post_forward", None)


@contextlib.contextmanager
def serial_routing():
    saved, routing.SERIAL_SMALL_OPS = routing.SERIAL_SMALL_OPS, True
    try:
        yield
    finally:
        routing.SERIAL_SMALL_OPS = saved


def forward(model, batch, context=contextlib.nullcontext):
    model.global_hidden_dict.clear()  # as Model.forward does at every call
    with context(), torch.inference_mode():
        return model.torch_model(**batch).logits


def routed_tokens(model, batch):
    """{host: (tokens, d_in, d_out)} for every routed linear, from one routed forward."""
    seen, handles = {}, []
    for name in model.addons["expert_lora"]:
        host = model.module(name)
        handles.append(host.register_forward_hook(
            lambda m, a, o, name=name: seen.__setitem__(name, (a[0].numel() // m.in_features, m.in_features,
                                                                 m.out_features))))
    forward(model, batch)
    for handle in handles:
        handle.remove()
    return seen


def flop_floor(base_flops, tokens, n_experts):
    k = min(TOP_K, n_experts)
    extra = sum(2 * t * (d_in * n_experts + k * RANK * (d_in + d_out)) for t, d_in, d_out in tokens.values())
    return (base_flops + extra) / base_flops


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    os.chdir(REPO_ROOT)  # the gin files include each other by repository-relative paths
    torch.set_num_threads(args.threads)
    model = build_model(args.size)
    config = model.torch_model.config
    shape = {name: getattr(config, name) for name in ("d_model", "num_layers", "num_decoder_layers", "num_heads", "d_ff")}
    print(f"{cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads, T5 {args.size} {shape}, "
          f"batch {BATCH} x "
          f"{ENCODER_TOKENS} encoder / {DECODER_TOKENS} decoder tokens, rank {RANK}, top-{TOP_K}, fp32, "
          f"{args.repeats} interleaved repeats, medians\n")
    generator = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(3, config.vocab_size, (BATCH, ENCODER_TOKENS), generator=generator),
             "attention_mask": torch.ones(BATCH, ENCODER_TOKENS, dtype=torch.long),
             "decoder_input_ids": torch.randint(3, config.vocab_size, (BATCH, DECODER_TOKENS), generator=generator)}
    order = random.Random(0)
    rows, routed_ratio = [], {}
    for n_experts in EXPERT_COUNTS:
        grow_to(model, n_experts, generator)
        with FlopCounterMode(display=False) as counter:
            forward(model, batch, lambda: addons_off(model))
        floor = flop_floor(counter.get_total_flops(), routed_tokens(model, batch), n_experts)
        variants = {"base": lambda: addons_off(model), "routed": contextlib.nullcontext,
                    "original-style": lambda: original_style(model)}
        if torch.get_num_threads() > 1:
            variants["routed-serial"] = serial_routing
        outputs = {name: forward(model, batch, context) for name, context in variants.items()}  # also the warm-up
        # Sanity: the variants compute the same model (relative to the logits' scale: twelve-odd routed layers, and a
        # near-tie in a top-2 can go either way after rounding), and the experts do change it.
        scale = outputs["routed"].abs().max().item()
        for name in variants:
            if name not in ("base", "routed"):
                error = (outputs[name] - outputs["routed"]).abs().max().item()
                assert error < 1e-3 * scale, (f"{name} differs from routed by {error} (logits up to {scale}) at "
                                              f"N={n_experts}")
        assert (outputs["routed"] - outputs["base"]).abs().max().item() > 1e-3 * scale, "the experts changed nothing"
        calls = {name: functools.partial(forward, model, batch, setting) for name, setting in variants.items()}
        times = interleaved_times(calls, args.repeats, order)
        ratio = {name: statistics.median(t / b for t, b in zip(times[name], times["base"])) for name in variants}
        routed_ratio[n_experts] = ratio["routed"]
        mt = f"{ratio['routed-serial']:.2f}" if "routed-serial" in ratio else "-"
        rows.append(f"| {n_experts} | {ratio['routed']:.2f} | {mt} | {ratio['original-style']:.2f} | {floor:.2f} "
                    f"| {ratio['routed'] / floor:.2f} | {statistics.median(times['base']):.2f} |")
        print(f"N={n_experts} done", flush=True)
    print("\n| N | routed/base | routed-serial/base | original-style/base | floor | routed/floor | base s |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\nrouted(N={EXPERT_COUNTS[-1]}) / routed(N={EXPERT_COUNTS[0]}) = "
          f"{routed_ratio[EXPERT_COUNTS[-1]] / routed_ratio[EXPERT_COUNTS[0]]:.2f} (ratio of the routed/base ratios)")


if __name__ == "__main__":
    main()
