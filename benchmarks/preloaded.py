"""What a launcher command costs as a plain process and through the preloaded Python (colm/utils/preloaded.py).

Run: .venv/bin/python benchmarks/preloaded.py [--repeats 5]

The command is a short one of the quickstart's kind, so that start-up dominates as it does for most of the
quickstart's fifty commands: `train_single_task_loralinear.sh` on the embedded model for 10 steps of the toy
sentiment task with one 16-example validation. Both variants run interleaved, repeat after repeat, from the same
environment (MODEL_TYPE=tiny, the caller's thread count), writing under exp_out/benchmarks_preloaded/ (removed at
the end). Prints the median wall time of each and their ratio, and checks that both wrote the same weights.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from colm.formats.checkpoint_io import read_checkpoint  # noqa: E402
from colm.utils import preloaded  # noqa: E402

OUT = "benchmarks_preloaded"  # under exp_out/


def command(name):
    bindings = ("main.logging_backend=None D/ToyDataset.num_examples=200 D/TOYSENTIMENT/EVAL/ToyDataset.num_examples=16 "
                "P/TRAIN/Trainer.num_steps=10 P/TRAIN/Trainer.validation_step_interval=10 P/TRAIN/Trainer.overwrite=True")
    return ["bash", "colm/experiments/bash_scripts/train_single_task_loralinear.sh", "-exp_name", f"{OUT}/{name}",
            "-dataset", "TOYSENTIMENT", "-extra_bindings", bindings]


def timed(argv, env):
    started = time.perf_counter()
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(argv)} failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    env = dict(os.environ, MODEL_TYPE="tiny")
    env.pop("COLM_PRELOADED", None)
    times = {"plain process": [], "preloaded": []}
    started = time.perf_counter()
    with preloaded.Server(env=env) as path:
        server_start = time.perf_counter() - started
        for _ in range(args.repeats):
            times["plain process"].append(timed(command("plain"), env))
            times["preloaded"].append(timed(command("preloaded"), dict(env, COLM_PRELOADED=path)))
    plain, fast = (read_checkpoint(os.path.join(ROOT, "exp_out", OUT, n, "best.pt")) for n in ("plain", "preloaded"))
    same = plain.keys() == fast.keys() and all(torch.equal(plain[k], fast[k]) for k in plain)
    shutil.rmtree(os.path.join(ROOT, "exp_out", OUT), ignore_errors=True)
    print(f"torch {torch.__version__}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, {args.repeats} interleaved "
          f"repeats, medians; the preloaded Python took {server_start:.1f} s to start (once)")
    print("| command | seconds |\n|---|---|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.2f} |")
    ratio = statistics.median(times["plain process"]) / statistics.median(times["preloaded"])
    print(f"plain / preloaded = {ratio:.2f}x; same weights written: {same}")


if __name__ == "__main__":
    main()
