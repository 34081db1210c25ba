"""Peak resident memory and time of loading N routed experts into a T5-base-sized model, the way evaluation does.

Run: .venv/bin/python benchmarks/loading_memory.py [--experts 166] [--tmp DIR] [--keep]
(after `source exp_launch/setup_environment_variable.sh`). Needs about the raw expert bytes of free disk under
--tmp (default: a new directory in the system temporary directory, outside the repository; 4.7 GB for 166
experts), and free memory for the writer (about the raw expert bytes) and then for the loader (what it
measures: 7.3 GB for 166 experts here). The checkpoint is deleted at the end unless --keep.

1. A child process (--write) writes one concatenated MoE checkpoint (`best.pt`, torch.save of a flat {key: tensor} dict, as
   colm/checkpoints/concatenate.py writes it) with N random rank-16 experts for a T5 v1.1 base-sized config
   (d_model 768, 12 encoder + 12 decoder layers, 12 heads of 64, d_ff 2048, gated-gelu, vocabulary 32128): for
   every routed linear m of the A2 architecture (every q, k, v, o, wi_0, wi_1, wo of the encoder and decoder,
   cross-attention included: 216 linears) and every expert i, `m._addons.expert_lora.layer1__<i>` (d_in x 16),
   `m._addons.expert_lora.layer2__<i>` (16 x d_out) and `m._addons.router.expert_embeddings__<i>` (d_in), each
   its own tensor, expert after expert (concatenation's order).
2. A fresh child process (--child) measures, from /proc/self/status:
     import RSS   VmRSS after importing torch, transformers and colm (the interpreter baseline);
     base         builds the base-sized T5 from its config (random weights: nothing to download);
     load         then builds colm's Model as an evaluation does: the A2 model gin
                  (colm/models/tiny/moe_lora_rank16_a2.gin, sizes read from the model) with
                  moma_calls.experts = [@M/MODEL/load_weights], trainable_params "none" (eval.gin), Model.torch_model
                  bound to the model built in "base". load_weights reads the checkpoint
                  (colm/formats/checkpoint_io.py) and loads it (colm/moma/weights.py), creating the N experts.
   Before "load" the peak counter VmHWM is reset (writing 5 to /proc/self/clear_refs), so the peak printed for
   it is the load's own; the overall peak is the larger of it and the peak before.
Reported: ratio = (peak RSS - import RSS) / (base parameter bytes + raw expert bytes); the goal is <= 1.1, i.e.
no full copy of the checkpoint beside the loaded experts. Also printed: what the load alone adds,
(peak RSS - RSS after building the base model) / raw expert bytes (for few experts the first ratio is mostly
the base model's own construction overhead). Load time: wall clock of the Model construction
(addons, reading, loading), and of read_checkpoint alone.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
from common import cpu_name  # noqa: E402  (benchmarks/common.py)

RANK = 16
GIB = 1024**3


def t5_base_config():
    import transformers

    return transformers.T5Config(vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, num_layers=12,
                                 num_decoder_layers=12, num_heads=12, feed_forward_proj="gated-gelu",
                                 tie_word_embeddings=False, dropout_rate=0.0, decoder_start_token_id=0,
                                 pad_token_id=0, eos_token_id=1)


def status(*fields):
    """{field: bytes} from /proc/self/status (VmRSS, VmHWM, RssAnon, RssFile)."""
    found = {}
    with open("/proc/self/status") as file:
        for line in file:
            name, _, value = line.partition(":")
            if name in fields:
                found[name] = int(value.split()[0]) * 1024
    return found


def reset_peak():
    with open("/proc/self/clear_refs", "w") as file:
        file.write("5")


def routed_linears(config):
    """{module name: (d_in, d_out)} of the linears the A2 gin routes (encoder_linear | decoder_linear), from a
    model built on the meta device (no memory)."""
    import re

    import torch
    import transformers

    from colm.models import module_names

    pattern = re.compile(module_names.to_regex(["encoder_linear", "decoder_linear"], "t5"))
    with torch.device("meta"):
        model = transformers.T5ForConditionalGeneration(config)
    return {name: (module.in_features, module.out_features) for name, module in model.named_modules()
            if pattern.fullmatch(name)}


def write_checkpoint_file(path, n_experts):
    """Writes the N-expert checkpoint; returns (raw expert bytes, number of tensors)."""
    import torch

    from colm.formats import keys as K
    from colm.formats.checkpoint_io import write_checkpoint

    linears = routed_linears(t5_base_config())
    generator = torch.Generator().manual_seed(0)
    state = {}
    for index in range(n_experts):
        for module, (d_in, d_out) in linears.items():
            for param, shape in ((K.LAYER1, (d_in, RANK)), (K.LAYER2, (RANK, d_out)), (K.EMBEDDINGS, (d_in,))):
                state[K.IndexedKey(module, param, index).key] = torch.randn(shape, generator=generator).mul_(0.02)
    raw = sum(t.numel() * t.element_size() for t in state.values())
    write_checkpoint(state, path)
    return raw, len(state), len(linears)


# ----- the child ------------------------------------------------------------------------------------------------
def child(checkpoint, n_experts):
    import gin
    import torch
    import transformers

    from colm import configurables, registry  # noqa: F401  (registers the gin configurables)
    from colm.ginparse import parse_gin
    from colm.models.model import Model
    from colm.moma import weights
    from colm.moma.moe import expert_count

    report = {"import_rss": status("VmRSS")["VmRSS"]}
    start = time.perf_counter()
    torch.manual_seed(0)
    base = transformers.T5ForConditionalGeneration(t5_base_config())
    report["base_seconds"] = time.perf_counter() - start
    report["base_bytes"] = sum(p.numel() * p.element_size() for p in base.parameters())
    report["base_rss"] = status("VmRSS")["VmRSS"]
    report["peak_before_load"] = status("VmHWM")["VmHWM"]

    @gin.configurable
    def prebuilt_t5():
        return base

    read_seconds = []
    read_checkpoint = weights.read_checkpoint

    def timed_read(path, **kwargs):
        begin = time.perf_counter()
        state = read_checkpoint(path, **kwargs)
        read_seconds.append(time.perf_counter() - begin)
        report["rss_after_read"] = status("VmRSS")["VmRSS"]
        return state

    prepare_seconds = []
    prepare_load = Model.prepare_load

    def timed_prepare(self, state):
        begin = time.perf_counter()
        prepare_load(self, state)
        prepare_seconds.append(time.perf_counter() - begin)
        report["rss_after_prepare"] = status("VmRSS")["VmRSS"]

    weights.read_checkpoint = timed_read
    Model.prepare_load = timed_prepare
    parse_gin(["colm/models/tiny/t5.gin", "colm/models/tiny/moe_lora_rank16_a2.gin"],
              ["M/MODEL/Model.torch_model = @prebuilt_t5()", "M/MODEL/Model.device = 'cpu'",
               "M/MODEL/Model.trainable_params = 'none'", "M/MODEL/moma_calls.experts = [@M/MODEL/load_weights]",
               f"M/MODEL/load_weights.weight_path = '{checkpoint}'"])
    reset_peak()
    start = time.perf_counter()
    model = registry.get_object("M/MODEL")
    report["load_seconds"] = time.perf_counter() - start
    report["read_seconds"], report["prepare_seconds"] = read_seconds[0], prepare_seconds[0]
    after = status("VmRSS", "VmHWM")
    report["load_peak"], report["final_rss"] = after["VmHWM"], after["VmRSS"]
    report["experts"] = expert_count(model)
    assert report["experts"] == n_experts, report["experts"]
    report["expert_param_bytes"] = sum(p.numel() * p.element_size() for name, p in model.torch_model.named_parameters()
                                       if "_addons" in name)
    print("CHILD-REPORT " + json.dumps(report), flush=True)


# ----- the parent -----------------------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--experts", type=int, default=166)
    parser.add_argument("--tmp", default=None, help="directory for the checkpoint (default: the system temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint (and reuse one that is there)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--write", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.experts)
        return
    if args.write:
        print("WRITER-REPORT " + json.dumps(write_checkpoint_file(args.write, args.experts)), flush=True)
        return
    import torch

    def run_child(flag, path, tag):
        """Runs this script with `flag path` in a fresh process; returns the JSON it printed after `tag`."""
        env = {**os.environ, "PYTHONPATH": REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
        done = subprocess.run([sys.executable, os.path.abspath(__file__), flag, path, "--experts", str(args.experts)],
                              cwd=REPO_ROOT, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{flag} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        line = next(x for x in done.stdout.splitlines() if x.startswith(tag + " "))
        return json.loads(line[len(tag) + 1:])

    directory = args.tmp or tempfile.mkdtemp(prefix="colm-loading-memory-")
    os.makedirs(directory, exist_ok=True)
    checkpoint = os.path.join(directory, f"moe_{args.experts}_experts.pt")
    try:
        start = time.perf_counter()
        if args.keep and os.path.isfile(checkpoint):
            raw, tensors, linears = None, None, None
        else:
            raw, tensors, linears = run_child("--write", checkpoint, "WRITER-REPORT")
        write_seconds = time.perf_counter() - start
        report = run_child("--child", checkpoint, "CHILD-REPORT")
        file_bytes = os.path.getsize(checkpoint)
    finally:
        if args.keep:
            pass
        elif args.tmp is None:
            shutil.rmtree(directory, ignore_errors=True)
        elif os.path.isfile(checkpoint):
            os.remove(checkpoint)
    raw = raw or report["expert_param_bytes"]
    peak = max(report["load_peak"], report["peak_before_load"])
    goal = report["base_bytes"] + raw
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {cpu_name()} ({os.cpu_count()} logical "
          f"CPUs), {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / GIB:.0f} GiB RAM")
    print(f"T5 base-sized (d_model 768, 12+12 layers, d_ff 2048), A2: {args.experts} rank-{RANK} experts"
          + (f" at {linears} linears ({tensors:,} tensors)" if tensors else "")
          + f"; checkpoint {file_bytes / GIB:.2f} GiB written in {write_seconds:.0f} s\n")
    rows = [
        ("import RSS (interpreter, torch, transformers, colm)", report["import_rss"]),
        ("base parameter bytes", report["base_bytes"]),
        ("raw expert bytes (sum of the checkpoint's tensors)", raw),
        ("expert parameter bytes after loading", report["expert_param_bytes"]),
        ("RSS after building the base model", report["base_rss"]),
        ("RSS after read_checkpoint", report["rss_after_read"]),
        ("RSS after prepare_load (the experts created)", report["rss_after_prepare"]),
        ("peak RSS while loading (VmHWM)", report["load_peak"]),
        ("RSS after loading", report["final_rss"]),
    ]
    print("| quantity | GiB |")
    print("|---|---|")
    for label, value in rows:
        print(f"| {label} | {value / GIB:.3f} |")
    print(f"\nratio (peak RSS - import RSS) / (base + raw experts) = {(peak - report['import_rss']) / goal:.3f} "
          "(goal <= 1.1)")
    print(f"loading alone: (peak RSS - RSS after building the base model) / raw expert bytes = "
          f"{(report['load_peak'] - report['base_rss']) / raw:.3f}")
    print(f"load time: {report['load_seconds']:.1f} s for the Model with its checkpoint, of which read_checkpoint "
          f"{report['read_seconds']:.1f} s and prepare_load (creating the experts) {report['prepare_seconds']:.1f} s "
          f"(building the base model: {report['base_seconds']:.1f} s, not counted)")


if __name__ == "__main__":
    main()
