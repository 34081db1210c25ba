"""The embedded tiny T5: a small gated-GELU T5 with the byte-level tokenizer, pre-trained on generic string
denoising so that LoRA experts learn toy skills in seconds. `scripts/make_tiny_t5.py` writes it to
colm/models/tiny/toy_t5 (an ordinary HF directory, loaded like google/t5-xl-lm-adapt).

The pre-training objective teaches reading and writing letter strings, not any toy skill: the input is a
random lowercase string (4-12 letters) with about a quarter of its letters replaced by '_', the target is the
whole string. Everything is seeded, so the directory is reproducible on the same torch build.
"""

import numpy as np
import torch
from transformers import ByT5Tokenizer, T5Config, T5ForConditionalGeneration

TINY_CONFIG = dict(
    vocab_size=384, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
    feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
    decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
)
LETTERS = list("abcdefghijklmnopqrstuvwxyz")


def make_tiny_t5(seed: int = 0) -> T5ForConditionalGeneration:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return T5ForConditionalGeneration(T5Config(**TINY_CONFIG))


def denoising_batch(rng, tokenizer, batch_size):
    inputs, targets = [], []
    for _ in range(batch_size):
        letters = rng.choice(LETTERS, size=int(rng.integers(4, 13)))
        noisy = letters.copy()
        noisy[rng.random(len(letters)) < 0.25] = "_"
        inputs.append("".join(noisy))
        targets.append("".join(letters))
    input_ids = tokenizer(inputs, padding=True, return_tensors="pt").input_ids
    labels = tokenizer(targets, padding=True, return_tensors="pt").input_ids
    return input_ids, labels.masked_fill(labels == tokenizer.pad_token_id, -100)


def pretrain(model, tokenizer, steps, batch_size=64, learning_rate=3e-3, seed=0, log_every=100):
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    model.train()
    for step in range(1, steps + 1):
        input_ids, labels = denoising_batch(rng, tokenizer, batch_size)
        loss = model(input_ids=input_ids, attention_mask=(input_ids != 0).long(), labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % log_every == 0:
            print(f"pre-training step {step}: loss {loss.item():.4f}", flush=True)
    return model.eval()


def build_toy_t5(pretrain_steps: int = 1500, seed: int = 0):
    """(model, tokenizer): the seeded tiny T5, pre-trained for `pretrain_steps` denoising steps."""
    model, tokenizer = make_tiny_t5(seed), ByT5Tokenizer()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if pretrain_steps:
            pretrain(model, tokenizer, pretrain_steps, seed=seed)
    return model, tokenizer
