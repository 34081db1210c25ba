"""The embedded T5: a miniature of T5 v1.1 LM-adapt, built and pre-trained offline on the toy world's text.

As T5 v1.1 LM-adapt (the paper's base) it has a learned subword vocabulary (here byte-pair merges learned with
the `tokenizers` library, so a word of the corpus is one token and any other text falls back to pieces and
letters), gated-GELU feed-forward layers and untied embeddings, and it is pre-trained in two stages:
span corruption (15% of the tokens in spans of mean length 3 replaced by sentinels; in its text-infilling
form, where the target is the whole sequence) and then LM adaptation (continue a sequence from a random split
point, on half of each batch; the other half stays on infilling). The corpus (`colm.datasets.toy.pretraining_text`)
has sixteen domains and each sequence comes from one of them, so every token's hidden state learns to carry
its sequence's domain, which is what per-token routing reads.

`scripts/make_tiny_t5.py` writes the model, tokenizer and a model card (MODEL_CARD.md with config, corpus,
steps and the loss log) to colm/models/tiny/toy_t5. Everything is seeded and runs on one CPU thread, so a
rebuild on the same torch build reproduces the logged losses (tests/test_toy_t5.py checks the first ones).
"""

import json
import math
import os

import numpy as np
import torch
from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

from colm.datasets import toy

SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]
NUM_SENTINELS = 16
SENTINELS = [f"<extra_id_{i}>" for i in range(NUM_SENTINELS)]
VOCAB_SIZE = 2048  # an upper bound: merges stop once every corpus word is one token
# Every single character a user's text is likely to hold, so nothing outside the corpus becomes <unk>.
ALPHABET = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;?!'\"()[]{}<>-+=*/_&%$#@|~")
FIRST_STEPS_LOGGED = 8
TINY_CONFIG = dict(
    d_model=128, d_kv=32, d_ff=256, num_layers=4, num_decoder_layers=4, num_heads=4,
    feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
    decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
)


def tokenizer_corpus(seed, num_sequences=20000):
    """Text the tokenizer is learned on: pre-training sequences plus the toy tasks' inputs and targets (a
    real tokenizer has seen the words of its instructions)."""
    rng = np.random.default_rng([seed, 1])
    texts = [toy.pretraining_text(rng) for _ in range(num_sequences)]
    for task in toy.TASKS:
        for _ in range(50):
            input_str, target, choices = toy.TASKS[task](rng)
            texts += [input_str, target] + list(choices or [])
    return texts


def build_tokenizer(seed=0):
    """A T5-style subword tokenizer (BPE over Metaspace-split words): pad 0, eos 1, unk 2, sentinels, and an eos appended to every text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE - NUM_SENTINELS, special_tokens=SPECIAL_TOKENS, min_frequency=2,
                                  initial_alphabet=ALPHABET + ["\u2581"], show_progress=False)
    tok.train_from_iterator(tokenizer_corpus(seed), trainer=trainer)
    tok.add_special_tokens(SENTINELS)
    eos = tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", eos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   additional_special_tokens=SENTINELS)


def make_model(vocab_size, seed=0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = T5ForConditionalGeneration(T5Config(vocab_size=vocab_size, **TINY_CONFIG))
    # HF initialises an untied lm_head with std 1 (logits of size sqrt(d_model), a first loss near 50); start
    # it at the embeddings' output scale instead, so the first steps are not spent shrinking it.
    with torch.no_grad():
        model.lm_head.weight.mul_(model.config.d_model ** -0.5)
    return model


def _segment(total, parts, rng):
    """`parts` positive lengths summing to `total` (uniformly random cut points)."""
    cuts = np.sort(rng.choice(np.arange(1, total), size=parts - 1, replace=False)) if parts > 1 else np.array([], int)
    return np.diff(np.concatenate([[0], cuts, [total]])).tolist()


def span_corruption(ids, rng, sentinel_ids, eos_id, density=0.15, mean_span=3.0):
    """Span corruption in its text-infilling form (as BART): spans covering ~density of the tokens become
    sentinels in the input, and the target is the whole original sequence. T5's short form (the target lists
    only the hidden spans) taught this small model, on this corpus, a decoder that barely read its encoder
    (prefix-LM loss 2.69 against 2.91 with the inputs of other sequences); writing the whole sequence makes
    every target token depend on the input."""
    n = len(ids)
    noise = min(max(1, round(n * density)), n - 1)
    spans = max(1, min(round(noise / mean_span), noise, n - noise, len(sentinel_ids)))
    noise_lengths, keep_lengths = _segment(noise, spans, rng), _segment(n - noise, spans, rng)
    inputs, position = [], 0
    for k in range(spans):
        inputs += ids[position : position + keep_lengths[k]]
        position += keep_lengths[k] + noise_lengths[k]
        inputs.append(sentinel_ids[k])
    return inputs + [eos_id], list(ids) + [eos_id]


def prefix_lm(ids, rng, eos_id):
    """LM adaptation: the model reads a prefix and writes the rest of the sequence."""
    split = int(rng.integers(1, len(ids)))
    return ids[:split] + [eos_id], ids[split:] + [eos_id]


def _batch(pairs, pad_id):
    def pad(seqs, fill):
        width = max(len(s) for s in seqs)
        return torch.tensor([s + [fill] * (width - len(s)) for s in seqs])

    input_ids = pad([p[0] for p in pairs], pad_id)
    return input_ids, (input_ids != pad_id).long(), pad([p[1] for p in pairs], -100)


def pretrain(model, tokenizer, span_steps, prefix_steps, seed=0, batch_size=64, learning_rate=3e-3, warmup=100,
             log_every=50, progress=None, stop_after=None):
    """Both stages, one optimiser and one cosine schedule over all steps. Returns the loss log
    [(step, stage, mean loss since the previous entry)]: every one of the first FIRST_STEPS_LOGGED steps (what
    the rebuild test replays), then every log_every steps."""
    rng = np.random.default_rng([seed, 2])
    sentinel_ids = tokenizer.convert_tokens_to_ids(SENTINELS)
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    total = span_steps + prefix_steps
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s / total, 1.0))))
    log, running = [], []
    model.train()
    for step in range(1, (stop_after or total) + 1):
        stage = "span_corruption" if step <= span_steps else "prefix_lm"
        texts = [toy.pretraining_text(rng) for _ in range(batch_size)]
        ids = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
        # LM adaptation keeps half of each batch on infilling, so the decoder keeps reading its encoder
        infill = np.ones(len(ids), bool) if stage == "span_corruption" else rng.random(len(ids)) < 0.5
        pairs = [span_corruption(x, rng, sentinel_ids, eos_id) if f else prefix_lm(x, rng, eos_id)
                 for x, f in zip(ids, infill)]
        input_ids, attention_mask, labels = _batch(pairs, pad_id)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        running.append(loss.item())
        if step <= FIRST_STEPS_LOGGED or step % log_every == 0 or step == total:
            log.append((step, stage, round(float(np.mean(running)), 5)))
            running = []
            if progress:
                progress(log[-1])
    return log


def build_toy_t5(span_steps=1000, prefix_steps=400, seed=0, progress=None, stop_after=None):
    """(model, tokenizer, loss log): the seeded embedded T5, pre-trained on one CPU thread (`stop_after`: end
    early, on the same schedule, as the rebuild test does)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same losses on every machine of a kind
    try:
        tokenizer = build_tokenizer(seed)
        model = make_model(len(tokenizer), seed)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            log = pretrain(model, tokenizer, span_steps, prefix_steps, seed=seed, progress=progress,
                           stop_after=stop_after)
    finally:
        torch.set_num_threads(threads)
    return model.eval(), tokenizer, log


def write_model_card(out_dir, model, tokenizer, log, span_steps, prefix_steps, seed, command):
    """MODEL_CARD.md (human-readable) and pretraining_log.json (read back by the rebuild test)."""
    with open(os.path.join(out_dir, "pretraining_log.json"), "w") as f:
        json.dump({"seed": seed, "span_steps": span_steps, "prefix_steps": prefix_steps, "log": log}, f, indent=1)
    params = sum(p.numel() for p in model.parameters())
    rows = "\n".join(f"| {step} | {stage} | {loss:.4f} |" for step, stage, loss in log if step % 250 == 0 or step == log[-1][0])
    config = ", ".join(f"{k}={v}" for k, v in TINY_CONFIG.items())
    text = f"""# The embedded T5 (colm/models/tiny/toy_t5)

A miniature of T5 v1.1 LM-adapt for CPU runs of the whole PHATGOOSE pipeline. Written by

    {command}

(`scripts/make_tiny_t5.py`, code in `colm/models/toy_t5.py`, about 20 minutes on one core), seeded; a rebuild
with the pinned torch reproduces the losses below (tests/test_toy_t5.py checks the first ones).

- Architecture: T5 encoder-decoder, {config}; vocabulary {len(tokenizer)} ({params / 1e6:.2f} M parameters).
- Tokenizer: BPE learned with the `tokenizers` library on the pre-training corpus and the toy tasks'
  text (a corpus word is one token; other text falls back to pieces and single letters); pad 0, eos 1, unk 2,
  {NUM_SENTINELS} sentinels `<extra_id_k>`; an eos is appended to every text, as T5's tokenizer does.
- Corpus: `colm.datasets.toy.pretraining_text`, one to three sentences from one of {len(toy.DOMAINS)} domains per
  sequence ({', '.join(toy.DOMAINS)}); drawn fresh each step (batch 64).
- Pre-training: {span_steps} steps of span corruption (15% noise, mean span 3) in its text-infilling form (the
  target is the whole sequence, so that the decoder learns to read the encoder), then {prefix_steps} steps of
  LM adaptation (prefix-LM on half of each batch, infilling on the other half); AdamW lr 3e-3, weight decay
  0.01, 100 warm-up steps, cosine decay over both stages, gradient clipping 1.0, seed {seed}. One CPU thread,
  AVX2 kernels (`colm/utils/reproducible.py`), so the losses are the same on any x86-64 machine.

| step | stage | mean training loss (last 50 steps) |
|---|---|---|
{rows}
"""
    with open(os.path.join(out_dir, "MODEL_CARD.md"), "w") as f:
        f.write(text)
