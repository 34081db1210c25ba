"""Writes the embedded tiny T5 (a small gated-GELU T5 with the byte-level tokenizer) as an HF directory.

    python scripts/make_tiny_t5.py --out colm/models/tiny/toy_t5

The weights are a seeded random initialisation, so the directory is reproducible.
"""

import argparse

import torch
from transformers import ByT5Tokenizer, T5Config, T5ForConditionalGeneration

TINY_CONFIG = dict(
    vocab_size=384, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
    feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
    decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
)


def make_tiny_t5(seed: int = 0) -> T5ForConditionalGeneration:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return T5ForConditionalGeneration(T5Config(**TINY_CONFIG))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="colm/models/tiny/toy_t5")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    make_tiny_t5(args.seed).save_pretrained(args.out)
    ByT5Tokenizer().save_pretrained(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
