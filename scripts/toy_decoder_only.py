"""The toy PHATGOOSE pipeline on the embedded decoder-only base (MODEL_TYPE=tiny_llama), through the launchers.

    python scripts/toy_decoder_only.py                    # exp_out/toy_decoder_only/, prints the table
    python scripts/toy_decoder_only.py --tasks ToySentiment ToyTopic --expert_steps 150 --gate_steps 60

Per held-in task: a LoRA expert (train_single_task_loralinear.sh), put_index_to_lora, its gate (train_gate.sh),
use_input_gate_as_router; then the gated experts concatenated (scripts/concatenate.py) and evaluated with
token-level top-2 routing (eval_multitask.sh, -arch A2) against the base model and each expert alone (-arch
single) on the held-in and held-out tasks. A stage whose output exists is skipped. Writes results.md.
"""

import argparse
import os
import shlex
import subprocess
import sys

from colm.datasets.settings import get_setting
from colm.procedures.results import read_results

SCRIPTS = "colm/experiments/bash_scripts"


def run(command, log):
    with open(log, "a") as f:
        f.write("$ " + shlex.join(command) + "\n")
        f.flush()
        argv = [sys.executable if command[0] == "python" else command[0]] + command[1:]
        if subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT).returncode != 0:
            raise SystemExit(f"failed: {shlex.join(command)}; see {log}")


def last_scores(path):
    header, results = read_results(path)[-1]
    return {name: values["score"] for name, values in results.items() if isinstance(values, dict)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="toy_decoder_only")
    parser.add_argument("--tasks", nargs="+", default=["ToySentiment", "ToyTopic", "ToyInstrument"])
    parser.add_argument("--held_out", nargs="+", default=["TOYFILMSENTIMENT", "TOYTOPICPARAPHRASE"])
    parser.add_argument("--expert_steps", type=int, default=200)
    parser.add_argument("--gate_steps", type=int, default=100)
    parser.add_argument("--train_examples", type=int, default=1000)
    parser.add_argument("--eval_examples", type=int, default=100)
    args = parser.parse_args()
    os.environ["MODEL_TYPE"] = "tiny_llama"
    root, out = args.root, os.path.join("exp_out", args.root)
    os.makedirs(out, exist_ok=True)
    log = os.path.join(out, "pipeline.log")
    held_in = get_setting(list(args.tasks))  # name -> scope
    scopes = list(held_in.values()) + list(args.held_out)
    data = (f"main.logging_backend=None D/ToyDataset.num_examples={args.train_examples} "
            + " ".join(f"D/{s}/EVAL/ToyDataset.num_examples={args.eval_examples}" for s in scopes))

    def train(steps):
        return (f"{data} P/TRAIN/Trainer.gradient_accumulation_factor=1 P/TRAIN/Trainer.overwrite=True "
                f"P/TRAIN/Trainer.num_steps={steps} P/TRAIN/Trainer.validation_step_interval={max(steps // 2, 1)}")

    evaluate = (f"{data} P/EVALUATE/save_results.overwrite=True P/EVALUATE/Evaluator.datasets=["
                + ", ".join(f'"D/{s}/EVAL"' for s in scopes) + "]")

    def done(exp):
        return os.path.isfile(os.path.join("exp_out", exp, "best.pt"))

    for name, scope in held_in.items():
        lora, moe, gated = f"{root}/experts/{name}_lora", f"{root}/moe/{name}_lora", f"{root}/moe/{name}_gated"
        if not done(lora):
            run(["bash", f"{SCRIPTS}/train_single_task_loralinear.sh", "-exp_name", lora, "-dataset", scope,
                 "-extra_bindings", train(args.expert_steps)], log)
        if not done(moe):
            run(["python", "scripts/manipulations.py", "--gin_bindings", "func_caller.func=@put_index_to_lora",
                 f'put_index_to_lora.path="{lora}"', f'put_index_to_lora.out_path="{moe}"'], log)
        if not os.path.isfile(os.path.join("exp_out", gated, "run_status.json")):
            run(["bash", f"{SCRIPTS}/train_gate.sh", "-exp_name", gated, "-dataset", scope, "-old_exp_name", moe,
                 "-extra_bindings", train(args.gate_steps)], log)
            run(["python", "scripts/manipulations.py", "--gin_bindings", "func_caller.func=@use_input_gate_as_router",
                 f'use_input_gate_as_router.path="{gated}"'], log)
    phatgoose = f"{root}/phatgoose"
    if not done(phatgoose):
        run(["python", "scripts/concatenate.py", "--gin_bindings",
             "run_concatenate.datasets=[" + ", ".join(f'"{n}"' for n in held_in) + "]",
             f'run_concatenate.expert_dir="{root}/moe"', 'run_concatenate.suffix="gated"',
             f'run_concatenate.out_path="{phatgoose}"'], log)
    rows = {"PHATGOOSE (top-2 token routing)": (phatgoose, [])}
    rows["Base model"] = (f"{root}/base", ["-extra_bindings", f"{evaluate} M/MODEL/Model.init_moma_calls=[]"])
    for name in held_in:
        rows[f"{name} expert alone"] = (f"{root}/moe/{name}_lora", ["-arch", "single"])
    for label, (exp, flags) in rows.items():
        results = os.path.join("exp_out", exp, "results.txt")
        if flags and flags[0] == "-extra_bindings":
            command = ["bash", f"{SCRIPTS}/eval_multitask.sh", "-exp_name", exp] + flags
        else:
            command = ["bash", f"{SCRIPTS}/eval_multitask.sh", "-exp_name", exp] + flags + ["-extra_bindings", evaluate]
        if label.startswith("Base"):
            os.makedirs(os.path.join("exp_out", exp), exist_ok=True)
        run(command, log)
        rows[label] = last_scores(results)
    in_scopes, out_scopes = [f"D/{s}/EVAL" for s in held_in.values()], [f"D/{s}/EVAL" for s in args.held_out]
    header = ["method", "held-in avg", "held-out avg"] + [f"{s[2:-5]} (in)" for s in in_scopes] + [
        f"{s[2:-5]} (out)" for s in out_scopes]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, scores in rows.items():
        averages = [sum(scores[k] for k in keys) / len(keys) for keys in (in_scopes, out_scopes)]
        values = averages + [scores[k] for k in in_scopes + out_scopes]
        lines.append("| " + " | ".join([label] + [f"{v:.3f}" for v in values]) + " |")
    table = "\n".join(lines)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
