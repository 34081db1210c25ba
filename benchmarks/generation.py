"""Greedy generation with routed experts and the KV cache: tokens per second against the number of experts N, CPU fp32.

Run: .venv/bin/python benchmarks/generation.py [--repeats 5 --experts 1 36 166 --threads N]
(after `source exp_launch/setup_environment_variable.sh`, which sets OMP_NUM_THREADS=1; --threads overrides)

Model: a T5-small-sized T5 v1.1 built from a config with random weights (no download): d_model 512, 6 encoder and
6 decoder layers, 8 heads of 64, d_ff 1024, gated-gelu, vocabulary 32128, head tied to the embedding. Each variant
is colm's Model around a copy of the same weights, built through gin as an evaluation builds it
(colm/models/tiny/t5.gin with Model.torch_model bound to that copy, trainable_params "none"):
  base  no addons (N = 0);
  N     the A2 architecture (colm/models/tiny/moe_lora_rank16_a2.gin: a router and rank-16 experts at every
        linear of the encoder and the decoder, cross-attention included, 108 linears), FFNExperts.topk_value=2 and
        normalize_topk=True (the evaluation bindings of eval_multitask.sh), extend_moe(N), then random router
        vectors and experts (so the routing spreads over the experts).
The batch: 8 inputs of 128 random tokens (no padding). One generation is the project's gen interface
(colm/models/interfaces.py gen_4encdec: HF generate, greedy, num_beams 1, with the KV cache) through
Model.forward, with max_gen_length 33 (the decoder start token and 32 generated tokens), under torch.no_grad()
and model.eval() as the Evaluator runs it. It includes the encoder pass. Tokens per second = 8 x the decoder
steps taken (32) / wall time. Also timed: the encoder pass alone (the model's encoder on the batch, routers and
experts included), and from it the time per decoder step, (generation - encoder) / steps. The variants take
turns, repeat after repeat (the order rotates), after one untimed warm-up each; "relative to base" is the median
over repeats of base time / variant time in the same repeat.
"""

import argparse
import copy
import os
import statistics
import sys
import time

import gin
import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import cpu_name, t5_small_config  # noqa: E402  (benchmarks/common.py)

from colm import configurables, registry  # noqa: E402,F401  (registers the gin configurables)
from colm.datasets.dataset import InterfaceInfo  # noqa: E402
from colm.ginparse import parse_gin  # noqa: E402
from colm.moma.moe import expert_count, extend_moe  # noqa: E402

BATCH, INPUT_LEN, NEW_TOKENS = 8, 128, 32
_PREBUILT = {}


@gin.configurable
def benchmark_prebuilt_t5():
    """The HF model the variant being built wraps (Model.torch_model = @benchmark_prebuilt_t5())."""
    return _PREBUILT["model"]




def build(base, n_experts, seed):
    """colm's Model around a copy of `base`, with n_experts random routed experts (none: the plain model)."""
    gin.clear_config()
    registry.reset()
    _PREBUILT["model"] = copy.deepcopy(base)
    files = ["colm/models/tiny/t5.gin"] + (["colm/models/tiny/moe_lora_rank16_a2.gin"] if n_experts else [])
    bindings = ["M/MODEL/Model.torch_model = @benchmark_prebuilt_t5()", "M/MODEL/Model.device = 'cpu'",
                "M/MODEL/Model.trainable_params = 'none'"]
    if n_experts:
        bindings += ["M/MODEL/FFNExperts.topk_value = 2", "M/MODEL/FFNExperts.normalize_topk = True"]
    parse_gin(files, bindings)
    model = registry.get_object("M/MODEL")
    if n_experts:
        extend_moe(model, num_new_experts=n_experts)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for router in model.addons["router"].values():
                router.expert_embeddings.copy_(torch.randn(router.expert_embeddings.shape, generator=generator))
            for experts in model.addons["expert_lora"].values():
                experts.layer2.copy_(torch.randn(experts.layer2.shape, generator=generator) * 0.02)
        assert expert_count(model) == n_experts
    model.eval()
    gin.clear_config()
    registry.reset()
    _PREBUILT.clear()
    return model


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--experts", type=int, nargs="+", default=[1, 36, 166])
    parser.add_argument("--threads", type=int, default=None, help="default: torch's (OMP_NUM_THREADS)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # gin paths are relative to the root
    torch.manual_seed(0)
    base = transformers.T5ForConditionalGeneration(t5_small_config())
    variants = {0: build(base, 0, seed=0)}
    for n in args.experts:
        variants[n] = build(base, n, seed=n)
    generator = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.randint(2, 32128, (BATCH, INPUT_LEN), generator=generator)}
    gen = InterfaceInfo(interface="gen", max_gen_length=NEW_TOKENS + 1)

    steps = {}
    mask = torch.ones_like(batch["input_ids"])

    def run(n):
        output = variants[n](batch, gen)
        steps[n] = output["output_ids"].shape[1] - 1  # the first column is the decoder start token

    def encode(n):
        model = variants[n]
        model.global_hidden_dict.clear()  # as Model.forward does
        model.torch_model.get_encoder()(input_ids=batch["input_ids"], attention_mask=mask)

    times = {n: [] for n in variants}
    encoder_times = {n: [] for n in variants}
    with torch.no_grad():
        for n in variants:  # warm-up
            run(n)
            encode(n)
        order = list(variants)
        for _ in range(args.repeats):
            for n in order:
                start = time.perf_counter()
                run(n)
                middle = time.perf_counter()
                encode(n)
                encoder_times[n].append(time.perf_counter() - middle)
                times[n].append(middle - start)
            order = order[1:] + order[:1]

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} thread(s), "
          f"{cpu_name()} ({os.cpu_count()} logical CPUs)")
    print(f"T5 d_model 512, 6+6 layers, d_ff 1024, gated-gelu; A2 routing, top-2, rank 16; batch {BATCH} x "
          f"{INPUT_LEN} tokens, greedy, {NEW_TOKENS} new tokens, KV cache; {args.repeats} interleaved repeats, "
          "medians\n")
    print("| N | generation s | tokens / s | relative to base (time base / time N) | encoder s | per decoder step ms "
          "| decoder step relative to base |")
    print("|---|---|---|---|---|---|---|")
    step_ms = {n: [(t - e) / steps[n] * 1e3 for t, e in zip(times[n], encoder_times[n])] for n in variants}
    for n in variants:
        seconds = statistics.median(times[n])
        relative = statistics.median(b / t for b, t in zip(times[0], times[n]))
        step_relative = statistics.median(b / t for b, t in zip(step_ms[0], step_ms[n]))
        print(f"| {n if n else '0 (base)'} | {seconds:.2f} | {BATCH * steps[n] / seconds:.0f} | {relative:.2f} "
              f"| {statistics.median(encoder_times[n]):.2f} | {statistics.median(step_ms[n]):.1f} "
              f"| {step_relative:.2f} |")
    print(f"\ndecoder steps per generation: {sorted(set(steps.values()))} (tokens / s counts {BATCH} x steps)")


if __name__ == "__main__":
    main()
