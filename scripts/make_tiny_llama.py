"""Writes the embedded decoder-only base (colm/models/toy_llama.py) as an HF directory with its tokenizer.

    python scripts/make_tiny_llama.py                          # colm/models/tiny_llama/toy_llama
    python scripts/make_tiny_llama.py --out /tmp/llama --steps 20   # a quick look
"""

import argparse
import shlex
import sys

from colm.utils.reproducible import set_reproducible_cpu_env

set_reproducible_cpu_env()  # before torch loads: the same weights on every x86 machine

from colm.models.toy_llama import build_toy_llama, write  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="colm/models/tiny_llama/toy_llama")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1000)
    args = parser.parse_args()
    model, tokenizer, log = build_toy_llama(args.steps, args.seed)
    for step, loss in log:
        print(f"step {step}/{args.steps}: loss {loss:.4f}")
    command = ("python scripts/make_tiny_llama.py " + shlex.join(sys.argv[1:])).strip()
    write(args.out, model, tokenizer, log, args.steps, args.seed, command)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
