"""Rank classification with the cross-attention keys and values computed once per example
(colm/models/interfaces.py choice_scores, shared_across_choices): the same scores and the same routing record as
the path that repeated the encoder output per choice (kept below as the reference), and the k / v linears see
one row per example. Generation: HF generate computes the cross-attention k / v once, at its first step."""

import pytest
import torch
from torch.nn import functional as F

from colm import registry
from colm.datasets.dataset import InterfaceInfo
from colm.ginparse import parse_gin
from colm.models.interfaces import choice_scores, cross_attention_kv
from colm.moma.moe import extend_moe
from colm.procedures.analysis import (
    RoutingDistribution,
    load_routing_distribution,
    routed_token_probs,
    routed_token_scores,
)

MOE_GINS = {  # the tiny model's MoE builds: per-token routing (A2), sentence-level routing, one decoder router (A1)
    "a2": "colm/models/tiny/moe_lora_rank16_a2.gin",
    "sentence": "colm/models/tiny/moe_lora_rank16.gin",
    "a1": "colm/models/tiny/moe_lora_rank16_a1.gin",
}
BINDINGS = ["M/MODEL/FFNExperts.topk_value=2", "M/MODEL/FFNExperts.normalize_topk=True", "M/MODEL/Model.device='cpu'"]


def reference_choice_scores(model, batch, interface_info):
    """choice_scores as it was before the keys and values were shared: the encoder output repeated per choice, so
    every cross-attention k / v linear (and its addons) ran on b * C rows."""
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
    token_loss = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none")
    lengths = (labels != -100).sum(dim=1).float()
    score = token_loss.sum(dim=1)
    if interface_info.length_normalization:
        score = score / (lengths + 1e-6)
    padding_choice = choices.reshape(b * c, t).eq(pad).all(dim=1)
    score = score.masked_fill(padding_choice, float("inf"))
    return score.view(b, c)


def run_mc(model, batch, info, scorer):
    """What Model.forward does for mc, with the given scorer: clear the shared dict, score, predict."""
    model.global_hidden_dict.clear()
    with torch.no_grad():
        scores = scorer(model, batch, info)
    return {"choice_scores": scores, "prediction": scores.argmin(dim=1)}


def mc_batch(n_choices, seed=0, b=3, length=13, width=4, vocab=1300):
    """b examples with padded inputs; choices of 1..width tokens; example 1 has one choice fewer (a padding-only
    choice), example 2 only one real choice."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (b, length), generator=gen)
    input_ids[1, length - 5:] = 0
    input_ids[2, 4:] = 0
    choices = torch.randint(3, vocab, (b, n_choices, width), generator=gen)
    lengths = torch.randint(1, width + 1, (b, n_choices), generator=gen)
    choices = choices.masked_fill(torch.arange(width) >= lengths[..., None], 0)
    if n_choices > 1:
        choices[1, -1] = 0
        choices[2, 1:] = 0
    return {"input_ids": input_ids, "answer_choices_ids": choices}


def moe_model(kind, n_experts=4, seed=0):
    parse_gin(["colm/models/tiny/t5.gin", MOE_GINS[kind]], BINDINGS)
    model = registry.get_object("M/MODEL")
    extend_moe(model, num_new_experts=n_experts)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for router in model.addons["router"].values():
            router.expert_embeddings.copy_(torch.randn(router.expert_embeddings.shape, generator=generator))
        for experts in model.addons["expert_lora"].values():
            experts.layer2.copy_(torch.randn(experts.layer2.shape, generator=generator) * 0.3)
            experts.layer1.mul_(30)
    model.eval()
    return model


def count_kv_rows(model):
    """{cross-attention k / v name: [rows of each call]}, recorded by hooks the caller removes."""
    rows, handles = {}, []
    for name, module in cross_attention_kv(model).items():
        rows[name] = []
        handles.append(module.register_forward_pre_hook(
            lambda m, args, name=name: rows[name].append(args[0].shape[0])))
    return rows, handles


@pytest.mark.parametrize("n_choices", [1, 2, 3, 5])
@pytest.mark.parametrize("length_normalization", [True, False])
def test_plain_model_scores_equal_the_repeated_path(make_model, n_choices, length_normalization):
    model = make_model()
    model.eval()
    batch = mc_batch(n_choices)
    info = InterfaceInfo(interface="mc", length_normalization=length_normalization)
    with torch.no_grad():
        out = model(batch, info)
    expected = run_mc(model, batch, info, reference_choice_scores)
    torch.testing.assert_close(out["choice_scores"], expected["choice_scores"], rtol=1e-5, atol=1e-5)
    assert torch.equal(out["prediction"], expected["prediction"])
    if n_choices > 1:
        assert torch.isinf(out["choice_scores"][1, -1]) and torch.isinf(out["choice_scores"][2, 1:]).all()


def _assert_same_shared_dict(model, got, want, n_choices):
    """The shared dict after the new path holds what the repeated path left, in the same order; only the hidden
    states exposed at the cross-attention k / v hold one row per example instead of one per choice."""
    assert list(got) == list(want)
    cross_kv = set(cross_attention_kv(model))
    for key, value in want.items():
        if isinstance(value, list):
            assert len(got[key]) == len(value), key
            for g, w in zip(got[key], value):
                torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5, msg=str(key))
        elif key[0] == "hidden_states" and key[2] in cross_kv and n_choices > 1:
            torch.testing.assert_close(got[key], value[::n_choices], rtol=1e-4, atol=1e-5, msg=str(key))
        else:
            assert got[key].shape == value.shape, key
            torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-5, msg=str(key))


@pytest.mark.parametrize("kind", sorted(MOE_GINS))
@pytest.mark.parametrize("n_choices", [1, 3, 4])
def test_routed_model_scores_and_routing_record_equal_the_repeated_path(kind, n_choices):
    model = moe_model(kind)
    batch = mc_batch(n_choices, seed=1)
    info = InterfaceInfo(interface="mc", length_normalization=True)
    kv = cross_attention_kv(model)
    assert all(hasattr(module, "_addons") and "expert_lora" in module._addons for module in kv.values())

    want = run_mc(model, batch, info, reference_choice_scores)
    want_shared = dict(model.global_hidden_dict)
    with torch.no_grad():
        got = model(batch, info)
    got_shared = dict(model.global_hidden_dict)
    torch.testing.assert_close(got["choice_scores"], want["choice_scores"], rtol=1e-4, atol=1e-4)
    assert torch.equal(got["prediction"], want["prediction"])
    _assert_same_shared_dict(model, got_shared, want_shared, n_choices)
    # What the routing analysis records per batch: the same modules, in the same order, the same token rows.
    for routed in (routed_token_probs, routed_token_scores):
        g = routed(batch, got, got_shared, model.pad_id, model.eos_id, model.architecture)
        w = routed(batch, want, want_shared, model.pad_id, model.eos_id, model.architecture)
        assert list(g) == list(w)
        for module in w:
            torch.testing.assert_close(g[module], w[module], rtol=1e-4, atol=1e-5, msg=module)

    # The experts at the cross-attention k / v do change the scores (the comparison above covers them).
    with torch.no_grad():
        for module in kv.values():
            module._addons["expert_lora"].layer2.zero_()
    without = run_mc(model, batch, info, choice_scores)["choice_scores"]
    real = torch.isfinite(without)
    assert (without[real] - got["choice_scores"][real]).abs().max() > 1e-3


def test_routing_distribution_files_are_unchanged(tmp_path):
    """RoutingDistribution over two batches (4 then 2 choices): the same file from either path."""
    model = moe_model("a2")
    info = InterfaceInfo(interface="mc", length_normalization=True)
    batches = [mc_batch(4, seed=2), mc_batch(2, seed=3)]
    loaded = {}
    for name, scorer in (("reference", reference_choice_scores), ("shared", choice_scores)):
        processor = RoutingDistribution(save_dir=str(tmp_path / name))
        for batch in batches:
            outputs = run_mc(model, batch, info, scorer)
            processor.batch_process(batch, outputs, model.global_hidden_dict, model)
        processor.dataset_process("D/X/EVAL")
        loaded[name] = load_routing_distribution(str(tmp_path / name / "D_X_EVAL.safetensors"))["modules"]
    got, want = loaded["shared"], loaded["reference"]
    assert list(got) == list(want)
    kv = next(iter(cross_attention_kv(model)))
    real_tokens = sum(int((b["input_ids"] != model.pad_id).sum()) * b["answer_choices_ids"].shape[1] for b in batches)
    assert want[kv]["tokens"] == real_tokens  # the record counts each input token once per choice at k / v
    for module, stats in want.items():
        assert got[module]["tokens"] == stats["tokens"], module
        assert (got[module]["top1_counts"] == stats["top1_counts"]).all(), module
        for key in ("mean_probs", "mean_scores"):
            torch.testing.assert_close(torch.as_tensor(got[module][key]), torch.as_tensor(stats[key]),
                                       rtol=1e-5, atol=1e-7)
        assert got[module]["mean_score_variance"] == pytest.approx(stats["mean_score_variance"], rel=1e-5)


@pytest.mark.parametrize("kind", [None, "a2"])
def test_cross_attention_kv_see_one_row_per_example(make_model, kind):
    model = make_model() if kind is None else moe_model(kind)
    model.eval()
    batch = mc_batch(4, seed=4)
    b = batch["input_ids"].shape[0]
    info = InterfaceInfo(interface="mc")
    hooks_before = {name: (len(m._forward_pre_hooks), len(m._forward_hooks))
                    for name, m in cross_attention_kv(model).items()}
    assert len(hooks_before) == 2 * model.torch_model.config.num_decoder_layers
    rows, handles = count_kv_rows(model)
    try:
        with torch.no_grad():
            model(batch, info)
        assert all(seen == [b] for seen in rows.values()), rows  # once per module, b rows (not b * C)
        for seen in rows.values():
            seen.clear()
        run_mc(model, batch, info, reference_choice_scores)
        assert all(seen == [b * 4] for seen in rows.values()), rows  # what the repeated path cost
    finally:
        for handle in handles:
            handle.remove()
    # shared_across_choices leaves no hook behind
    assert {name: (len(m._forward_pre_hooks), len(m._forward_hooks))
            for name, m in cross_attention_kv(model).items()} == hooks_before


@pytest.mark.parametrize("num_beams", [1, 2])
def test_generation_computes_cross_attention_kv_once(make_model, num_beams):
    """HF generate with its cache: each cross-attention k / v linear runs once, at the first decoder step, on one
    row per example (per beam with beam search: generate expands the encoder output per beam)."""
    model = make_model()
    model.eval()
    ids = mc_batch(1, seed=5)["input_ids"]
    rows, handles = count_kv_rows(model)
    steps = []
    q = model.module("decoder.block.0.layer.0.SelfAttention.q")
    handles.append(q.register_forward_pre_hook(lambda m, args: steps.append(args[0].shape[1])))
    try:
        with torch.no_grad():
            output_ids = model({"input_ids": ids}, InterfaceInfo(interface="gen", max_gen_length=8,
                                                                 num_beams=num_beams))["output_ids"]
    finally:
        for handle in handles:
            handle.remove()
    assert output_ids.shape[1] >= 3 and len(steps) >= 2 and set(steps) == {1}  # several cached one-token steps
    assert all(seen == [ids.shape[0] * num_beams] for seen in rows.values()), rows
