"""Rank classification (the `mc` interface of an encoder-decoder): examples per second, CPU fp32.

Run: .venv/bin/python benchmarks/mc_shared_kv.py [--repeats 5] [--size small|base] [--threads N]

One batch: 8 examples, 256 input tokens each (no padding), 4 answer choices of 1 to 4 tokens (right-padded).
The model is a T5 built offline from a config (random weights, nothing downloaded; gated-gelu, vocab 32128):
  small (default)  d_model 512, 6 + 6 layers, 8 heads of 64, d_ff 1024 (T5-small-sized)
  base             d_model 768, 12 + 12 layers, 12 heads of 64, d_ff 2048 (T5-base-sized)
The default is T5-small-sized because the T5-base-sized model takes about a minute per repeat on this 2-core
machine (its encoder alone: 6 to 8 s per batch), so a run with several repeats would exceed two minutes.

Three paths, each scoring every choice of every example (summed token cross-entropy, length-normalised):
  original-style  the input re-encoded once per choice: the whole model on b * C rows (encoder included)
  repeated        the previous colm path, copied here as it was: the encoder once per example, its output
                  repeated per choice, so every cross-attention k / v linear projects b * C rows
  shared          colm.models.interfaces.choice_scores: the encoder AND the cross-attention keys and values
                  once per example (b rows), repeated for the choices (interfaces.shared_across_choices)
All paths run interleaved, repeat after repeat; a ratio is the median over repeats of the same-repeat time ratio.
The scores of the three paths are checked to agree before timing.
"""

import argparse
import os
import statistics
import sys
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from transformers import T5Config, T5ForConditionalGeneration

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from colm.models import interfaces  # noqa: E402
from colm.models.architecture import T5  # noqa: E402

BATCH, INPUT_TOKENS, CHOICES, MAX_CHOICE_TOKENS, VOCAB, PAD = 8, 256, 4, 4, 32128, 0
SIZES = {
    "small": dict(d_model=512, d_kv=64, num_heads=8, num_layers=6, num_decoder_layers=6, d_ff=1024),
    "base": dict(d_model=768, d_kv=64, num_heads=12, num_layers=12, num_decoder_layers=12, d_ff=2048),
}
INFO = SimpleNamespace(length_normalization=True)


def make_model(size):
    config = T5Config(vocab_size=VOCAB, feed_forward_proj="gated-gelu", dropout_rate=0.0, pad_token_id=PAD,
                      decoder_start_token_id=PAD, eos_token_id=1, **SIZES[size])
    torch.manual_seed(0)
    torch_model = T5ForConditionalGeneration(config).eval()
    # What interfaces.choice_scores reads of a colm Model (no addons: a plain T5).
    return SimpleNamespace(torch_model=torch_model, pad_id=PAD, architecture=T5, addons={}, global_hidden_dict={})


def make_batch(generator):
    input_ids = torch.randint(3, VOCAB, (BATCH, INPUT_TOKENS), generator=generator)
    choices = torch.randint(3, VOCAB, (BATCH, CHOICES, MAX_CHOICE_TOKENS), generator=generator)
    lengths = torch.randint(1, MAX_CHOICE_TOKENS + 1, (BATCH, CHOICES), generator=generator)
    choices = choices.masked_fill(torch.arange(MAX_CHOICE_TOKENS) >= lengths[..., None], PAD)
    return {"input_ids": input_ids, "answer_choices_ids": choices}


def scores_from_logits(logits, labels, b, c, choices, info):
    token_loss = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none")
    score = token_loss.sum(dim=1)
    if info.length_normalization:
        score = score / ((labels != -100).sum(dim=1).float() + 1e-6)
    return score.masked_fill(choices.reshape(b * c, -1).eq(PAD).all(dim=1), float("inf")).view(b, c)


def original_style_scores(model, batch, info):
    """Every (example, choice) pair as its own sequence: the input re-encoded for each choice."""
    input_ids, choices = batch["input_ids"], batch["answer_choices_ids"]
    b, c, t = choices.shape
    repeated = input_ids.repeat_interleave(c, dim=0)
    labels = choices.reshape(b * c, t).masked_fill(choices.reshape(b * c, t) == PAD, -100)
    logits = model.torch_model(input_ids=repeated, attention_mask=(repeated != PAD).long(), labels=labels).logits
    return scores_from_logits(logits, labels, b, c, choices, info)


def repeated_encoder_output_scores(model, batch, info):
    """colm's choice_scores before the keys and values were shared (encoder once; k / v per choice), as it was."""
    pad = model.pad_id
    input_ids, choices = batch["input_ids"], batch["answer_choices_ids"]
    b, c, t = choices.shape
    attention_mask = (input_ids != pad).long()
    encoder_out = model.torch_model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask)
    hidden = encoder_out.last_hidden_state.repeat_interleave(c, dim=0)
    labels = choices.reshape(b * c, t).masked_fill(choices.reshape(b * c, t) == pad, -100)
    logits = model.torch_model(
        encoder_outputs=(hidden,), attention_mask=attention_mask.repeat_interleave(c, dim=0), labels=labels
    ).logits
    return scores_from_logits(logits, labels, b, c, choices, info)


def shared_scores(model, batch, info):
    model.global_hidden_dict.clear()  # as Model.forward does before every call
    return interfaces.choice_scores(model, batch, info)


PATHS = {"original-style": original_style_scores, "repeated": repeated_encoder_output_scores,
         "shared": shared_scores}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", choices=tuple(SIZES), default="small")
    parser.add_argument("--threads", type=int, default=None, help="default: torch's (OMP_NUM_THREADS)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = make_model(args.size)
    batch = make_batch(torch.Generator().manual_seed(0))
    size = SIZES[args.size]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, T5-{args.size}-sized "
          f"(d_model {size['d_model']}, {size['num_layers']}+{size['num_decoder_layers']} layers, "
          f"{size['num_heads']} heads, d_ff {size['d_ff']}), batch {BATCH}, {INPUT_TOKENS}-token inputs, "
          f"{CHOICES} choices of 1-{MAX_CHOICE_TOKENS} tokens, {args.repeats} interleaved repeats, medians\n")
    with torch.inference_mode():
        results = {name: fn(model, batch, INFO) for name, fn in PATHS.items()}  # also the warm-up
        for name, scores in results.items():  # sanity: every path scores the same choices alike
            torch.testing.assert_close(scores, results["original-style"], rtol=1e-4, atol=1e-4, msg=name)
        times = {name: [] for name in PATHS}
        for _ in range(args.repeats):
            for name, fn in PATHS.items():
                start = time.perf_counter()
                fn(model, batch, INFO)
                times[name].append(time.perf_counter() - start)

    def speedup(name, over):
        return statistics.median(o / t for o, t in zip(times[over], times[name]))

    print("| path | ms per batch | examples / s | speed-up over original-style | speed-up over repeated |")
    print("|---|---|---|---|---|")
    for name in PATHS:
        median = statistics.median(times[name])
        print(f"| {name} | {median * 1e3:.0f} | {BATCH / median:.2f} | {speedup(name, 'original-style'):.2f} "
              f"| {speedup(name, 'repeated'):.2f} |")
    ratio = speedup("shared", "original-style")
    print(f"\nshared / original-style examples per second = {ratio:.2f} (target >= 3: "
          f"{'met' if ratio >= 3 else 'NOT met'})")


if __name__ == "__main__":
    main()
