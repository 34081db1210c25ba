"""End to end: Router.sublinear_scoring on the embedded model with many experts, through eval_multitask.sh.

    python scripts/ocean_eval.py [--experts 1024] [--source exp_out/quickstart/phatgoose/best.pt]
                                 [--modes exact approximate] [--examples 50] [--profile]

1. Writes exp_out/<exp_name>/best.pt (default exp_name ocean_tiny_<N>): the tiny T5 with N experts at every
   linear (A2), made of P prototype experts: those of --source (a concatenated PHATGOOSE checkpoint, such as
   the quickstart's) or, without one, P random ones. Expert i is prototype i mod P: its LoRA factors (shared in
   the file, so it stays small) and its router vector plus Gaussian noise of --spread times its norm (copies
   of an expert with slightly different gates, as many experts of related tasks would have).
2. Evaluates that checkpoint with colm/experiments/bash_scripts/eval_multitask.sh (MODEL_TYPE tiny, A2, top-2
   renormalised) by default (exp_out/<exp_name>_default) and with M/MODEL/Router.sublinear_scoring set to
   each of --modes (exp_out/<exp_name>_<mode>), each with WriteOutputText, and times each launcher call.
3. Compares every prediction (output_text/<dataset>.json) of each mode with the default's and prints the
   scores; exits 1 when an "exact" prediction differs.
4. With --profile: times the model in this process on the first batches of each dataset, the modes
   interleaved (the launcher times above include start-up and loading, and the machine may be shared), with
   the time spent in the routers, and counts the (token, expert) scores the exact index computed.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from colm import configurables, registry  # noqa: E402,F401  (registers every gin configurable)
from colm.formats.checkpoint_io import read_checkpoint, write_checkpoint  # noqa: E402
from colm.ginparse import parse_gin  # noqa: E402

MODEL_GINS = ["colm/models/tiny/t5.gin", "colm/models/tiny/moe_lora_rank16_a2.gin"]
DATASETS = ["D/TOYTOPIC/EVAL", "D/TOYQA/EVAL"]  # rank classification and generation
QUICKSTART = "exp_out/quickstart/phatgoose/best.pt"
ROUTER, LAYER1, LAYER2 = "._addons.router.expert_embeddings__", "._addons.expert_lora.layer1__", "._addons.expert_lora.layer2__"


def random_prototypes(count, generator):
    """{key: tensor} of `count` random experts at every linear of the tiny A2 model (rank 16)."""
    from colm.moma.moe import extend_moe

    parse_gin(MODEL_GINS, ["M/MODEL/Model.device='cpu'"])
    model = registry.get_object("M/MODEL")
    extend_moe(model, num_new_experts=count)
    state = {}
    for key, value in model.torch_model.state_dict().items():
        if "_addons" in key:
            std = 1.0 if ROUTER in key else 0.1 if LAYER1 in key else 0.05
            state[key] = torch.randn(value.shape, generator=generator) * std
    return state


def ocean_state(prototypes, n_experts, spread, generator):
    """N experts from P prototypes: expert i has prototype (i mod P)'s LoRA tensors (the same tensor objects,
    stored once) and its router vector plus noise of norm about spread * the vector's norm."""
    modules = sorted({key.split(ROUTER)[0] for key in prototypes if ROUTER in key})
    count = sum(1 for key in prototypes if key.startswith(modules[0] + ROUTER))
    state = {}
    for module in modules:
        for i in range(n_experts):
            p = i % count
            gate = prototypes[f"{module}{ROUTER}{p}"].float()
            noise = torch.randn(gate.shape, generator=generator) * spread * gate.norm() / math.sqrt(gate.numel())
            state[f"{module}{ROUTER}{i}"] = gate + noise
            state[f"{module}{LAYER1}{i}"] = prototypes[f"{module}{LAYER1}{p}"]
            state[f"{module}{LAYER2}{i}"] = prototypes[f"{module}{LAYER2}{p}"]
    return state, count


def launch(exp_name, checkpoint, datasets, examples, extra):
    bindings = [f"P/EVALUATE/Evaluator.datasets={json.dumps(datasets)}",
                "P/EVALUATE/Evaluator.analysis_processors=[@WriteOutputText()]",
                f"D/ToyDataset.max_examples_per_dataset={examples}",
                f'M/MODEL/load_weights.weight_path="{checkpoint}"'] + extra
    env = dict(os.environ, MODEL_TYPE="tiny")
    start = time.perf_counter()
    done = subprocess.run(["bash", "colm/experiments/bash_scripts/eval_multitask.sh", "-exp_name", exp_name,
                           "-extra_bindings", " ".join(bindings)], cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"eval_multitask.sh -exp_name {exp_name} failed:\n{done.stderr[-4000:]}")
    return seconds


def predictions(exp_name, dataset):
    path = os.path.join(ROOT, "exp_out", exp_name, "output_text", dataset.replace("/", "_") + ".json")
    with open(path) as f:
        return [record.get("output_text", record.get("prediction")) for record in json.load(f)]


def scores(exp_name):
    with open(os.path.join(ROOT, "exp_out", exp_name, "results.txt")) as f:
        text = f.read()
    return text.strip().splitlines()[-1]


def profile(checkpoint, datasets, modes, batches=2, repeats=3):
    """In this process, on the first `batches` evaluation batches of each dataset, modes interleaved over
    `repeats`: {mode: (median seconds of the model calls, median seconds inside the routers)}, and the
    (token, expert) scores the exact index computed: {"index" | "small": (scored, T x N)}, "small" being the
    blocks with too few tokens for the index (decoding steps), which it scores exhaustively."""
    import statistics

    import gin

    from colm.moma import ocean
    from colm.moma.weights import load_weights
    from colm.procedures.batchers import SingleTaskBatcher

    gin.clear_config()
    registry.reset()
    parse_gin(["colm/datasets/toy.gin"] + MODEL_GINS,
              ["M/MODEL/Model.device='cpu'", "M/MODEL/Model.trainable_params='none'",
               "M/MODEL/FFNExperts.topk_value=2", "M/MODEL/FFNExperts.normalize_topk=True",
               "M/MODEL/Router.sublinear_scoring='exact'"])
    model = registry.get_object("M/MODEL")
    load_weights(model, weight_path=checkpoint)
    batcher = SingleTaskBatcher(shuffle=False, drop_last=False)
    batcher.set_tokenizer(model.tokenizer)
    batcher.set_seed(42)
    work = []
    for scope in datasets:
        dataset = registry.get_object(scope)
        dataset.set_tokenizer(model.tokenizer)
        for i, batch in enumerate(batcher.iterate([dataset], epoch=0, stride=None)):
            if i == batches:
                break
            work.append((batch, dataset.interface_info))

    routers = list(model.addons["router"].values())
    inside = [0.0]
    for router in routers:  # Addon hooks look pre_forward up on the instance: time every router call
        def timed(args, kwargs, forward=router.pre_forward):
            start = time.perf_counter()
            result = forward(args, kwargs)
            inside[0] += time.perf_counter() - start
            return result
        router.pre_forward = timed
    counts, search, counting = {}, ocean.search, [False]

    def counting_search(index, y, k, *args, **kwargs):
        found = search(index, y, k, *args, **kwargs)
        if counting[0]:
            kind = "small" if y.shape[0] < ocean.MIN_TOKENS_PER_CLUSTER * index.n_clusters else "index"
            scored, total = counts.get(kind, (0, 0))
            counts[kind] = (scored + found.pairs_scored, total + y.shape[0] * index.n_experts)
        return found

    ocean.search = counting_search
    times = {mode: [] for mode in ["default"] + modes}
    try:
        for repeat in range(repeats + 1):  # the first round warms up (and builds the indexes)
            for mode in times:
                for router in routers:
                    router.sublinear = None if mode == "default" else mode
                counting[0] = repeat == 1 and mode == "exact"
                inside[0] = 0.0
                start = time.perf_counter()
                with torch.no_grad():
                    for batch, info in work:
                        model(batch, info)
                if repeat:
                    times[mode].append((time.perf_counter() - start, inside[0]))
    finally:
        ocean.search = search
    medians = {mode: tuple(statistics.median(t[i] for t in runs) for i in (0, 1)) for mode, runs in times.items()}
    return medians, counts, len(work)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=1024)
    parser.add_argument("--source", default="auto", help=f"a concatenated checkpoint whose experts are the prototypes; "
                        f"auto: {QUICKSTART} if it exists, else random prototypes; none: random prototypes")
    parser.add_argument("--prototypes", type=int, default=8, help="random prototypes when there is no --source")
    parser.add_argument("--spread", type=float, default=0.3)
    parser.add_argument("--modes", nargs="+", default=["exact", "approximate"])
    parser.add_argument("--datasets", nargs="+", default=DATASETS)
    parser.add_argument("--examples", type=int, default=50, help="examples per dataset")
    parser.add_argument("--exp_name", default=None)
    parser.add_argument("--bindings", nargs="*", default=[], help="more gin bindings for every evaluation")
    parser.add_argument("--profile", action="store_true", help="also time the routers in this process (minutes)")
    args = parser.parse_args()
    exp_name = args.exp_name or f"ocean_tiny_{args.experts}"
    checkpoint = os.path.join("exp_out", exp_name, "best.pt")
    generator = torch.Generator().manual_seed(0)

    start = time.perf_counter()
    source = args.source
    if source == "auto":
        source = QUICKSTART if os.path.isfile(os.path.join(ROOT, QUICKSTART)) else "none"
    source = None if source == "none" else source
    prototypes = read_checkpoint(source) if source else random_prototypes(args.prototypes, generator)
    state, count = ocean_state(prototypes, args.experts, args.spread, generator)
    os.makedirs(os.path.join(ROOT, "exp_out", exp_name), exist_ok=True)
    write_checkpoint(state, os.path.join(ROOT, checkpoint))
    size = os.path.getsize(os.path.join(ROOT, checkpoint)) / 2**20
    print(f"{checkpoint}: {args.experts} experts from {count} prototypes ({source or 'random'}), router noise "
          f"{args.spread}, {size:.0f} MiB, written in {time.perf_counter() - start:.1f} s")

    runs = {"default": args.bindings} | {mode: args.bindings + [f'M/MODEL/Router.sublinear_scoring="{mode}"']
                                         for mode in args.modes}
    seconds = {}
    for mode, extra in runs.items():
        seconds[mode] = launch(f"{exp_name}_{mode}", checkpoint, args.datasets, args.examples, extra)
        print(f"eval_multitask.sh ({mode}): {seconds[mode]:.1f} s; {scores(f'{exp_name}_{mode}')}", flush=True)

    failed = False
    for mode in args.modes:
        same = total = 0
        for dataset in args.datasets:
            ours, default = predictions(f"{exp_name}_{mode}", dataset), predictions(f"{exp_name}_default", dataset)
            same += sum(a == b for a, b in zip(ours, default))
            total += len(default)
            for i, (a, b) in enumerate(zip(ours, default)):
                if a != b:
                    print(f"  {mode} differs on {dataset} example {i}: {a!r}, default {b!r}")
        print(f"{mode}: {same}/{total} predictions identical to the default's")
        failed |= mode == "exact" and same != total
    if failed:
        print("The default path divides the kept probabilities by (their sum + FFNExperts.epsilon), which depends on "
              "every expert's score (colm/moma/ocean.py); --bindings M/MODEL/FFNExperts.epsilon=0.0 compares "
              "without it.")

    if args.profile:
        medians, counts, n_batches = profile(os.path.join(ROOT, checkpoint), args.datasets, args.modes)
        print(f"In this process, {n_batches} batches (the first {n_batches // len(args.datasets)} of each dataset), "
              "modes interleaved, medians of 3:")
        for mode, (total, routers) in medians.items():
            print(f"  {mode}: {total:.2f} s, of which {routers:.2f} s in the routers")
        for kind, (scored, total) in sorted(counts.items()):
            label = {"index": "blocks searched through the index",
                     "small": "blocks of too few tokens (decoding steps), scored exhaustively"}[kind]
            print(f"  exact mode, {label}: {scored / max(total, 1):.3f} of {total} (token, expert) scores computed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
