"""The embedded decoder-only base (MODEL_TYPE=tiny_llama): a small Llama-style causal LM built and pre-trained
offline on the toy world's text, with the embedded T5's tokenizer (colm/models/tiny/toy_t5: BPE learned on the same
corpus; pad 0, eos 1, an eos appended to every text).

The causal LM reads an input and continues with its target, the input's eos being the separator (the layout of
colm/models/interfaces.py's decoder-only interfaces). Pre-training teaches that layout on the corpus of the
embedded T5 (`colm.datasets.toy.pretraining_text`, one domain per sequence, so every token's hidden state carries
its sequence's domain), with a fifth of the sequences made of the toy tasks' words, unpaired (task_words_text):
each sequence is split at a random point into `prefix </s> rest </s>` and the model learns every next token. Seeded and on one CPU thread, so a rebuild with the pinned torch writes the same weights.

    python scripts/make_tiny_llama.py        # writes colm/models/tiny_llama/toy_llama (about 4 minutes on one core)
"""

import json
import math
import os

import numpy as np
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from colm.datasets import toy

TOKENIZER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny", "toy_t5")
TINY_CONFIG = dict(
    hidden_size=64, intermediate_size=192, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
    max_position_embeddings=512, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=None,
)


def load_tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def make_model(vocab_size, seed=0, **overrides):
    """A randomly initialised Llama-style model of the tiny config (overrides: any LlamaConfig field)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, **{**TINY_CONFIG, **overrides}))


def task_words_text(rng):
    """A sequence of the toy tasks' words without their pairing: one task input, or the targets of a few draws of
    the tasks (a real pre-trained model has seen the words of instructions and answers, not the tasks). Without it
    the answer words are never a target in pre-training and this small model's output rows for them sink so far
    that a LoRA expert cannot lift them (its sentiment loss stalls at ln(250))."""
    tasks = list(toy.TASKS)
    if rng.random() < 0.5:
        return toy.TASKS[tasks[int(rng.integers(len(tasks)))]](rng)[0]
    draws = [toy.TASKS[tasks[int(rng.integers(len(tasks)))]](rng) for _ in range(int(rng.integers(3, 7)))]
    return " ".join(target for _, target, _ in draws)


def _split_sequence(ids, rng, eos_id):
    split = int(rng.integers(1, len(ids)))
    return ids[:split] + [eos_id] + ids[split:] + [eos_id]


def pretrain(model, tokenizer, steps, seed=0, batch_size=32, learning_rate=3e-3, warmup=50, log_every=50,
             task_words=0.2):
    """Next-token training on `prefix </s> rest </s>` sequences, a fraction `task_words` of them the tasks' words
    (task_words_text); returns [(step, mean loss since the last entry)]."""
    rng = np.random.default_rng([seed, 2])
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))))
    log, running = [], []
    model.train()
    for step in range(1, steps + 1):
        texts = [task_words_text(rng) if rng.random() < task_words else toy.pretraining_text(rng)
                 for _ in range(batch_size)]
        seqs = [_split_sequence(tokenizer(t, add_special_tokens=False).input_ids, rng, eos_id) for t in texts]
        width = max(len(s) for s in seqs)
        ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in seqs])
        mask = (ids != pad_id).long()
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        running.append(loss.item())
        if step % log_every == 0 or step == steps:
            log.append((step, round(float(np.mean(running)), 5)))
            running = []
    return log


def build_toy_llama(steps=1000, seed=0):
    """(model, tokenizer, loss log), seeded, on one CPU thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tokenizer = load_tokenizer()
        model = make_model(len(tokenizer), seed)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            log = pretrain(model, tokenizer, steps, seed=seed)
    finally:
        torch.set_num_threads(threads)
    return model.eval(), tokenizer, log


def write(out_dir, model, tokenizer, log, steps, seed, command):
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "pretraining_log.json"), "w") as f:
        json.dump({"seed": seed, "steps": steps, "command": command, "log": log}, f, indent=1)
