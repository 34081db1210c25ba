"""A LoRA training step, ours (colm/moma/lora.py) against Hugging Face PEFT's LoRA, CPU fp32.

Run: .venv/bin/python benchmarks/lora_vs_peft.py [--steps 14 --warmup 2 --threads N]
(after `source exp_launch/setup_environment_variable.sh`, which sets OMP_NUM_THREADS=1; --threads overrides)

Model: a T5-small-sized T5 v1.1 built from a config with random weights (no download): d_model 512, 6 encoder
and 6 decoder layers, 8 heads of 64, d_ff 1024, gated-gelu, vocabulary 32128, head tied to the embedding (so the
logits are O(1): an untied random head gives logits in the hundreds, a first loss near 200 and a backward slowed
several times by denormal floats).
LoRA of rank 16 on every q, k, v, o (self- and cross-attention) and wi_0, wi_1, wo, encoder and decoder (108
linears):
  ours  the project's path: colm's Model with modify_with_lora("lora_hosts", "lora_children") (the plain LoRA of
        colm/models/moe_lora_rank16.gin), trainable_params "expert" (train.gin), run through the lm interface.
        LoRALinear adds (x A^T B^T) / r, A ~ N(0, 1) * 0.01, B = 0.
  peft  peft.get_peft_model with LoraConfig(r=16, lora_alpha=1, dropout 0, task SEQ_2_SEQ_LM): PEFT scales by
        lora_alpha / r, so alpha = 1 is our 1/r. Both start from the same base weights, and our A and B values are
        copied into PEFT's lora_A / lora_B, so both are the same function at step 0.
One fixed batch (8 x 128 input tokens, 8 x 32 target tokens, no padding); torch.optim.AdamW(lr=5e-3) on the
LoRA factors of each. A step is zero_grad, forward (loss), backward, optimizer step. The two take turns step by
step (the order swaps every step); the first --warmup steps are not timed. Each ratio is the median over
steps of the same step's times. Times are wall clock and process CPU time (on a shared machine the CPU time is
the steadier: another process's load stretches the wall clock, not the CPU time of a single-threaded run).
The loss curves of all steps are compared (max |difference|).
"""

import argparse
import copy
import os
import statistics
import sys
import time
import warnings

import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import cpu_name, t5_small_config  # noqa: E402  (benchmarks/common.py)

from colm.datasets.dataset import InterfaceInfo  # noqa: E402
from colm.models.hf_loading import hf_tokenizer  # noqa: E402
from colm.models.model import Model  # noqa: E402
from colm.moma.lora import LoRALinear, modify_with_lora  # noqa: E402

RANK, LR = 16, 5e-3
BATCH, INPUT_LEN, TARGET_LEN = 8, 128, 32
TARGETS = ["q", "k", "v", "o", "wi_0", "wi_1", "wo"]
TINY_TOKENIZER = "colm/models/tiny/toy_t5"  # only its pad / eos ids are used




def lora_model(base):
    return Model(name="M/MODEL", torch_model=base, tokenizer=hf_tokenizer(TINY_TOKENIZER), trainable_params="expert",
                 device="cpu",
                 init_moma_calls=[lambda m: modify_with_lora(m, lora_modules="lora_hosts", lora_layers="lora_children")])


def build_models():
    """{name: (model, trainable parameters)} and the number of LoRA linears; every model starts identical."""
    import peft

    torch.manual_seed(0)
    base = transformers.T5ForConditionalGeneration(t5_small_config())
    peft_base = copy.deepcopy(base)  # the same frozen weights for both
    ours = lora_model(base)
    config = peft.LoraConfig(r=RANK, lora_alpha=1, lora_dropout=0.0, bias="none", target_modules=TARGETS,
                             task_type="SEQ_2_SEQ_LM")
    theirs = peft.get_peft_model(peft_base, config)
    linears = 0
    with torch.no_grad():
        for name, module in ours.torch_model.named_modules():
            if not isinstance(module, LoRALinear):
                continue
            assert module.d_bottleneck == RANK
            other = theirs.base_model.model.get_submodule(name)
            assert abs(other.scaling["default"] - 1.0 / RANK) < 1e-12, other.scaling
            other.lora_A["default"].weight.copy_(module.expert_lora_a)
            other.lora_B["default"].weight.copy_(module.expert_lora_b)
            linears += 1
    models = {"ours": (ours, [p for _, p in ours.named_trainable_parameters()]),
              "peft": (theirs, [p for p in theirs.parameters() if p.requires_grad])}
    sizes = {name: sum(p.numel() for p in params) for name, (_, params) in models.items()}
    assert sizes["ours"] == sizes["peft"], sizes
    for model, _ in models.values():
        model.train()
    return models, linears


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="default: torch's (OMP_NUM_THREADS)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import peft

    warnings.filterwarnings("ignore", category=FutureWarning)  # PEFT asks transformers a deprecated question
    models, linears = build_models()
    n_lora = sum(p.numel() for p in models["ours"][1])
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(2, 32128, (BATCH, INPUT_LEN), generator=generator)
    target_ids = torch.randint(2, 32128, (BATCH, TARGET_LEN), generator=generator)
    batch = {"input_ids": input_ids, "target_ids": target_ids}
    lm = InterfaceInfo(interface="lm")

    def colm_loss(model):
        return lambda: model(batch, lm)["loss"]

    def peft_loss(model):
        return lambda: model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=target_ids).loss

    variants = {name: ((peft_loss if name == "peft" else colm_loss)(model), torch.optim.AdamW(params, lr=LR))
                for name, (model, params) in models.items()}
    phases = ("forward", "backward", "optimizer", "step")
    wall = {name: {phase: [] for phase in phases} for name in variants}
    cpu = {name: [] for name in variants}
    losses = {name: [] for name in variants}
    order = list(variants)
    for step in range(args.steps):
        for name in order:
            loss_fn, optimizer = variants[name]
            cpu_start, start = time.process_time(), time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn()
            forward_done = time.perf_counter()
            loss.backward()
            backward_done = time.perf_counter()
            optimizer.step()
            done, cpu_done = time.perf_counter(), time.process_time()
            losses[name].append(loss.item())
            if step >= args.warmup:
                cpu[name].append(cpu_done - cpu_start)
                for phase, seconds in zip(phases, (forward_done - start, backward_done - forward_done,
                                                   done - backward_done, done - start)):
                    wall[name][phase].append(seconds)
        order.reverse()

    def ratio(series, a, b):
        return statistics.median(x / y for x, y in zip(series[a], series[b]))

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
          f"{torch.get_num_threads()} thread(s), {cpu_name()} ({os.cpu_count()} logical CPUs)")
    print(f"T5 d_model 512, 6+6 layers, d_ff 1024, gated-gelu; rank {RANK} LoRA on {linears} linears "
          f"({n_lora:,} trainable parameters); batch {BATCH} x {INPUT_LEN} -> {TARGET_LEN}; AdamW lr {LR}; "
          f"{args.steps} steps, the first {args.warmup} untimed; ours and PEFT take turns, medians\n")
    print("| time | ours ms | PEFT ms | ours / PEFT |")
    print("|---|---|---|---|")
    rows = [(f"{phase} (wall)", {name: wall[name][phase] for name in variants}) for phase in phases]
    rows.append(("step (CPU time)", cpu))
    for label, series in rows:
        print(f"| {label} | " + " | ".join(f"{statistics.median(series[n]) * 1e3:.1f}" for n in variants)
              + f" | {ratio(series, 'ours', 'peft'):.3f} |")
    print()
    for name in variants:
        print(f"loss per step ({name}): " + " ".join(f"{v:.4f}" for v in losses[name]))
    diff = max(abs(a - b) for a, b in zip(losses["ours"], losses["peft"]))
    print(f"max |loss(ours) - loss(peft)| over {args.steps} steps: {diff:.3g}")


if __name__ == "__main__":
    main()
