"""How a model runs on a batch, per interface (spec 5.4), per architecture (BY_ARCHITECTURE; T5: encoder-decoder;
LLAMA and GPT2: decoder-only causal LMs).

- lm: teacher-forced cross-entropy on the target (mean over non-pad target tokens).
- gen: greedy (or beam, T5 only) generation, decoded without special tokens.
- mc: rank classification. The encoder runs ONCE per example, and so do the cross-attention keys and values:
  every cross-attention k / v linear (with the routers and experts it hosts) computes one row per example, which
  is then repeated for the example's answer choices (`shared_across_choices`): the choices add the decoder's
  work on their own few tokens, not C projections of the whole input per layer. Each choice's score is its
  summed token loss, divided by its length when length_normalization. Padding-only choices (examples with fewer
  choices) score +inf. Prediction = argmin. gen needs nothing of the kind: HF generate keeps the cross-attention
  keys and values in its cache, computed at the first step only (tests/test_mc_shared_kv.py counts the calls).

Decoder-only: the batch is the same (input_ids, target_ids, answer_choices_ids, each right-padded, each text
ended by the tokenizer's eos). The model reads the input's tokens (its eos is the separator) and continues with
the target, so
- lm: one sequence per example, input then target; the loss is on the target's tokens only;
- gen: the prompts are moved to the right (left padding, positions counted from each row's first real token),
  then greedy decoding with the KV cache until every row has written eos or max_gen_length tokens; output_ids
  start with each prompt's last token, as T5's start with the decoder start token;
- mc: the shared prefix (the input) runs ONCE per example with the cache on; the cache is repeated for every
  answer choice and the choices run as one continuation of it. A choice's first token is scored by the prefix's
  last logits, the others by the continuation's. Scores equal those of running input + choice whole.
"""

import contextlib

import torch
from torch.nn import functional as F

from colm.models import architecture
from colm.models.architecture import GPT2, LLAMA, T5
from colm.moma.moe import Router


def _labels(target_ids, pad_id):
    return target_ids.masked_fill(target_ids == pad_id, -100)


def lm_4encdec(model, batch, interface_info):
    pad = model.pad_id
    out = model.torch_model(
        input_ids=batch["input_ids"], attention_mask=(batch["input_ids"] != pad).long(),
        labels=_labels(batch["target_ids"], pad),
    )
    return {"loss": out.loss}


def gen_4encdec(model, batch, interface_info):
    input_ids = batch["input_ids"]
    output_ids = model.torch_model.generate(
        input_ids=input_ids, attention_mask=(input_ids != model.pad_id).long(),
        num_beams=interface_info.num_beams, max_length=interface_info.max_gen_length, do_sample=False,
        # transformers syncs every decoding step across ranks for a module FSDP manages (it expects sharded
        # weights), but generation here always runs on whole weights, each rank on its own shard of examples, and
        # ranks with unequal numbers of batches then wait for each other forever.
        synced_gpus=False,
    )
    texts = model.tokenizer.batch_decode(output_ids, skip_special_tokens=True)
    return {"output_ids": output_ids, "output_text": texts}


def cross_attention_kv(model) -> dict:
    """{name: module} of the cross-attention key and value linears (the architecture's `cross_stack`)."""
    pattern = architecture.facts(model.architecture).cross_stack
    return {name: module for name, module in model.torch_model.named_modules() if pattern.fullmatch(name)}


@contextlib.contextmanager
def shared_across_choices(model, choices):
    """While active, every cross-attention k / v linear reads its input's rows [0, C, 2C, ...], one per example
    (the decoder gets the encoder output repeated C times, one row per answer choice: the rows of an example are
    equal), computes on those, addons included, and repeats each output row C times for the attention.

    Two hooks per linear, removed on exit: a pre-hook put FIRST, so the addons' pre-forward (ExposeHidden, Router)
    sees the shared rows, and a post-hook put LAST, after the addons' post-forward (FFNExperts) has added the
    experts. Everything still runs inside the decoder's forward, layer after layer, at the moment it ran before:
    a router on the whole decoder (A1) has written its weights before the first k / v reads them, and the shared
    dict receives its entries in the same order as when every choice had its own rows."""
    if choices == 1:
        yield
        return

    def one_row_per_example(module, args, kwargs):
        x = args[0] if args else kwargs["input"]
        if x.shape[0] % choices:
            raise RuntimeError(f"shared_across_choices: a cross-attention k / v input of {x.shape[0]} rows is not "
                               f"{choices} rows (choices) per example.")
        shared = x[::choices]
        return ((shared, *args[1:]), kwargs) if args else (args, {**kwargs, "input": shared})

    def one_row_per_choice(module, args, kwargs, output):
        return output.repeat_interleave(choices, dim=0)

    handles = []
    try:
        for module in cross_attention_kv(model).values():
            handles.append(module.register_forward_pre_hook(one_row_per_example, with_kwargs=True, prepend=True))
            handles.append(module.register_forward_hook(one_row_per_choice, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def router_outputs_per_choice(model, choices):
    """Leaves in the shared dict what the routers of the cross-attention k / v wrote when every choice had its
    own rows: their routing weights and scores, computed once per example, repeated C times (row b * C + c for
    choice c of example b), as the routing analysis (colm/procedures/analysis.py routed_token_values) counts
    them: each real input token once per choice at these modules. Only routers that read a hidden state exposed
    at a cross-attention k / v (every model gin's routers there do) computed on shared rows; the hidden states
    those exposers wrote stay one row per example (they are read inside the forward only)."""
    if choices == 1:
        return
    cross = architecture.facts(model.architecture).cross_stack
    shared = model.global_hidden_dict
    for hosts in model.addons.values():
        for host, addon in hosts.items():
            if not (isinstance(addon, Router) and cross.fullmatch(host) and isinstance(addon.read_key[2], str)
                    and cross.fullmatch(addon.read_key[2])):
                continue
            for key in (addon.write_key, addon.scores_key):
                if isinstance(shared.get(key), torch.Tensor):
                    shared[key] = shared[key].repeat_interleave(choices, dim=0)


def choice_scores(model, batch, interface_info):
    """Per-choice loss (B, C): summed token cross-entropy, length-normalised if asked; +inf for padding.
    The encoder and the cross-attention keys and values run once per example (module docstring)."""
    pad = model.pad_id
    input_ids, choices = batch["input_ids"], batch["answer_choices_ids"]
    b, c, t = choices.shape
    attention_mask = (input_ids != pad).long()
    encoder_out = model.torch_model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask)
    # One row per choice for the decoder and its masks; the k / v linears read one row per example of it.
    hidden = encoder_out.last_hidden_state.repeat_interleave(c, dim=0)
    labels = _labels(choices.reshape(b * c, t), pad)
    with shared_across_choices(model, c):
        logits = model.torch_model(
            encoder_outputs=(hidden,), attention_mask=attention_mask.repeat_interleave(c, dim=0), labels=labels,
            use_cache=False,  # one teacher-forced pass: nothing to keep
        ).logits
    router_outputs_per_choice(model, c)
    token_loss = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none")
    lengths = (labels != -100).sum(dim=1).float()
    score = token_loss.sum(dim=1)
    if interface_info.length_normalization:
        score = score / (lengths + 1e-6)
    padding_choice = choices.reshape(b * c, t).eq(pad).all(dim=1)
    score = score.masked_fill(padding_choice, float("inf"))
    return score.view(b, c)


def mc_byppl_4encdec(model, batch, interface_info):
    scores = choice_scores(model, batch, interface_info)
    return {"choice_scores": scores, "prediction": scores.argmin(dim=1)}


ENCODER_DECODER = {"lm": lm_4encdec, "gen": gen_4encdec, "mc": mc_byppl_4encdec}


# ----- decoder-only causal LMs ----------------------------------------------------------------------------------
def _real_lengths(ids, pad):
    """Real tokens per row of a right-padded batch (a pad id never occurs inside a tokenized text)."""
    return (ids != pad).sum(dim=1)


def join_right_padded(first, second, pad):
    """Each row's real tokens of `first` followed by its real tokens of `second`, right-padded.
    Returns (ids, attention_mask, in_second) of shape (B, longest row)."""
    len1, len2 = _real_lengths(first, pad), _real_lengths(second, pad)
    total = len1 + len2
    positions = torch.arange(int(total.max()), device=first.device)[None, :]
    from_first = first.gather(1, positions.clamp(max=first.shape[1] - 1).expand(first.shape[0], -1))
    from_second = second.gather(1, (positions - len1[:, None]).clamp(0, second.shape[1] - 1))
    ids = torch.where(positions < len1[:, None], from_first, from_second)
    real = positions < total[:, None]
    ids = ids.masked_fill(~real, pad)
    in_second = real & (positions >= len1[:, None])
    return ids, real.long(), in_second


def left_padded(ids, pad):
    """A right-padded batch moved to the right: (ids, attention_mask, position_ids), positions counting from each
    row's first real token (0 on padding)."""
    lengths = _real_lengths(ids, pad)
    width = ids.shape[1]
    source = torch.arange(width, device=ids.device)[None, :] - (width - lengths)[:, None]
    real = source >= 0
    moved = ids.gather(1, source.clamp(min=0)).masked_fill(~real, pad)
    mask = real.long()
    return moved, mask, (mask.cumsum(dim=1) - 1).clamp(min=0)


def lm_4causal(model, batch, interface_info):
    pad = model.pad_id
    ids, mask, in_target = join_right_padded(batch["input_ids"], batch["target_ids"], pad)
    labels = ids.masked_fill(~in_target, -100)  # the model shifts them: logits at t predict the token at t + 1
    out = model.torch_model(input_ids=ids, attention_mask=mask, labels=labels)
    return {"loss": out.loss}


def greedy_generate(model, input_ids, max_new_tokens, use_cache=True):
    """Greedy continuations (B, n <= max_new_tokens) of right-padded prompts; after a row's eos, pad. With
    use_cache=False every step re-runs the whole sequence (the reference the cache is tested against)."""
    pad, eos = model.pad_id, model.eos_id
    ids, mask, positions = left_padded(input_ids, pad)
    out = model.torch_model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=use_cache)
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    generated = []
    for _ in range(max_new_tokens):
        next_token = out.logits[:, -1].argmax(dim=-1).masked_fill(finished, pad)
        generated.append(next_token)
        finished = finished | (next_token == eos)
        if bool(finished.all()) or len(generated) == max_new_tokens:
            break
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        if use_cache:
            position = mask.sum(dim=1, keepdim=True) - 1
            out = model.torch_model(input_ids=next_token[:, None], attention_mask=mask, position_ids=position,
                                    cache=out.cache, use_cache=True)
        else:
            ids = torch.cat([ids, next_token[:, None]], dim=1)
            positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
            out = model.torch_model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
    if not generated:
        return input_ids.new_zeros(input_ids.shape[0], 0)
    return torch.stack(generated, dim=1)


def gen_4causal(model, batch, interface_info):
    if interface_info.num_beams not in (None, 1):
        raise NotImplementedError(f"Decoder-only generation is greedy; num_beams={interface_info.num_beams}.")
    generated = greedy_generate(model, batch["input_ids"], interface_info.max_gen_length)
    texts = model.tokenizer.batch_decode(generated, skip_special_tokens=True)
    # The layout of T5's output (and of the routing analysis, colm/procedures/analysis.py): output_ids start with
    # the token that wrote the first generated one (here each prompt's last token, its eos), and the routers' steps
    # (<key> + ("concatenated",)) hold one token per step: of the prompt's pass only its last token is kept.
    last = left_padded(batch["input_ids"], model.pad_id)[0][:, -1:]
    for key, steps in model.global_hidden_dict.items():
        if isinstance(key, tuple) and key[-1] == "concatenated" and steps and steps[0].dim() == 3:
            steps[0] = steps[0][:, -1:]
    return {"output_ids": torch.cat([last, generated], dim=1), "output_text": texts}


def choice_scores_4causal(model, batch, interface_info):
    """Per-choice loss (B, C) as choice_scores, the prefix run once per example (its KV cache shared by the choices)."""
    pad = model.pad_id
    input_ids, choices = batch["input_ids"], batch["answer_choices_ids"]
    b, c, t = choices.shape
    prefix, prefix_mask, positions = left_padded(input_ids, pad)
    out = model.torch_model(input_ids=prefix, attention_mask=prefix_mask, position_ids=positions, use_cache=True)
    cache = out.cache
    cache.batch_repeat_interleave(c)  # in place: every choice continues its own example's prefix
    flat = choices.reshape(b * c, t)
    choice_mask = flat != pad
    mask = torch.cat([prefix_mask.repeat_interleave(c, dim=0), choice_mask.long()], dim=1)
    start = prefix_mask.sum(dim=1).repeat_interleave(c)
    choice_positions = start[:, None] + torch.arange(t, device=flat.device)[None, :]
    continued = model.torch_model(input_ids=flat, attention_mask=mask, position_ids=choice_positions, cache=cache,
                                  use_cache=True)
    first = out.logits[:, -1:].repeat_interleave(c, dim=0)  # predicts each choice's first token
    logits = torch.cat([first, continued.logits[:, :-1]], dim=1)
    labels = flat.masked_fill(~choice_mask, -100)
    token_loss = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none")
    score = token_loss.sum(dim=1)
    if interface_info.length_normalization:
        score = score / (choice_mask.sum(dim=1).float() + 1e-6)
    score = score.masked_fill(~choice_mask.any(dim=1), float("inf"))
    return score.view(b, c)


def mc_byppl_4causal(model, batch, interface_info):
    scores = choice_scores_4causal(model, batch, interface_info)
    return {"choice_scores": scores, "prediction": scores.argmin(dim=1)}


CAUSAL = {"lm": lm_4causal, "gen": gen_4causal, "mc": mc_byppl_4causal}

# Model.architecture (module_names.architecture_of) -> {interface name: function(model, batch, interface_info)}
BY_ARCHITECTURE = {T5: ENCODER_DECODER, LLAMA: CAUSAL, GPT2: CAUSAL}


def for_architecture(architecture: str) -> dict:
    if architecture not in BY_ARCHITECTURE:
        raise NotImplementedError(f"No lm / gen / mc interfaces for architecture {architecture!r}; add them to "
                                  "colm/models/interfaces.py BY_ARCHITECTURE.")
    return BY_ARCHITECTURE[architecture]
