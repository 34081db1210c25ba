"""Writes the embedded tiny T5 (colm/models/toy_t5.py) as an HF directory.

    python scripts/make_tiny_t5.py --out colm/models/tiny/toy_t5 --pretrain_steps 1500
"""

import argparse

import torch

from colm.models.toy_t5 import build_toy_t5


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="colm/models/tiny/toy_t5")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pretrain_steps", type=int, default=1500)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = build_toy_t5(args.pretrain_steps, args.seed)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
