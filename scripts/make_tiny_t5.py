"""Writes the embedded T5 (colm/models/toy_t5.py) as an HF directory with its tokenizer and model card.

    python scripts/make_tiny_t5.py                      # colm/models/tiny/toy_t5, about 20 minutes on one core
    python scripts/make_tiny_t5.py --out /tmp/t5 --span_steps 20 --prefix_steps 10   # a quick look
"""

import argparse
import os
import shlex
import sys

from colm.utils.reproducible import set_reproducible_cpu_env

set_reproducible_cpu_env()  # before torch loads: the same losses on every x86 machine

from colm.models.toy_t5 import build_toy_t5, write_model_card  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="colm/models/tiny/toy_t5")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--span_steps", type=int, default=1000, help="span-corruption pre-training steps")
    parser.add_argument("--prefix_steps", type=int, default=400, help="prefix-LM adaptation steps")
    args = parser.parse_args()

    def progress(entry):
        step, stage, loss = entry
        print(f"step {step}/{args.span_steps + args.prefix_steps} ({stage}): loss {loss:.4f}", flush=True)

    model, tokenizer, log = build_toy_t5(args.span_steps, args.prefix_steps, args.seed, progress=progress)
    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    command = "python scripts/make_tiny_t5.py " + shlex.join(sys.argv[1:])
    write_model_card(args.out, model, tokenizer, log, args.span_steps, args.prefix_steps, args.seed, command.strip())
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
