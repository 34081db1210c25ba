"""How a model runs on a batch, per interface (spec 5.4), per architecture (BY_ARCHITECTURE; T5: encoder-decoder).

- lm: teacher-forced cross-entropy on the target (mean over non-pad target tokens).
- gen: greedy (or beam) generation, decoded without special tokens.
- mc: rank classification. The encoder runs ONCE per example; its output is repeated for every answer
  choice; each choice's score is its summed token loss, divided by its length when length_normalization.
  Padding-only choices (examples with fewer choices) score +inf. Prediction = argmin.
"""

from torch.nn import functional as F

from colm.models.architecture import T5


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
    )
    texts = model.tokenizer.batch_decode(output_ids, skip_special_tokens=True)
    return {"output_ids": output_ids, "output_text": texts}


def choice_scores(model, batch, interface_info):
    """Per-choice loss (B, C): summed token cross-entropy, length-normalised if asked; +inf for padding."""
    pad = model.pad_id
    input_ids, choices = batch["input_ids"], batch["answer_choices_ids"]
    b, c, t = choices.shape
    attention_mask = (input_ids != pad).long()
    encoder_out = model.torch_model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask)
    hidden = encoder_out.last_hidden_state.repeat_interleave(c, dim=0)
    labels = _labels(choices.reshape(b * c, t), pad)
    logits = model.torch_model(
        encoder_outputs=(hidden,), attention_mask=attention_mask.repeat_interleave(c, dim=0), labels=labels
    ).logits
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

# Model.architecture (module_names.architecture_of) -> {interface name: function(model, batch, interface_info)}
BY_ARCHITECTURE = {T5: ENCODER_DECODER}


def for_architecture(architecture: str) -> dict:
    if architecture not in BY_ARCHITECTURE:
        raise NotImplementedError(f"No lm / gen / mc interfaces for architecture {architecture!r}; add them to "
                                  "colm/models/interfaces.py BY_ARCHITECTURE.")
    return BY_ARCHITECTURE[architecture]
