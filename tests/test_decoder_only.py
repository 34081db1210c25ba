"""Decoder-only causal LMs (Llama-style and GPT-2, built offline from tiny configs with the embedded tokenizer):
architecture facts, LoRA, the lm / gen / mc interfaces, and a PHATGOOSE-routed model with two experts."""

import os

import pytest
import torch
from conftest import REPO_ROOT
from transformers import GPT2Config, GPT2LMHeadModel

from colm import registry
from colm.datasets.dataset import InterfaceInfo, tokenize
from colm.ginparse import parse_gin
from colm.models import architecture as A
from colm.models import interfaces, module_names
from colm.models.model import Model
from colm.models.toy_llama import load_tokenizer, make_model
from colm.moma.lora import LoRALinear, modify_with_lora
from colm.moma.moe import extend_moe

TOY_LLAMA = os.path.join(REPO_ROOT, "colm/models/tiny_llama/toy_llama")
TINY = dict(layers=2, width=64)


def llama_torch_model(vocab_size):
    return make_model(vocab_size, seed=0, hidden_size=TINY["width"], intermediate_size=128,
                      num_hidden_layers=TINY["layers"])


def gpt2_torch_model(vocab_size):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_embd=TINY["width"], n_layer=TINY["layers"], n_head=4,
                                          n_positions=256, bos_token_id=None, eos_token_id=1, pad_token_id=0))


BUILDERS = {"llama": llama_torch_model, "gpt2": gpt2_torch_model}


def model_of(kind, init_moma_calls=()):
    tokenizer = load_tokenizer()
    torch_model = BUILDERS[kind](len(tokenizer)).eval()
    return Model(name="M/MODEL", torch_model=torch_model, tokenizer=tokenizer, init_moma_calls=init_moma_calls,
                 device="cpu")


def batch_of(model, inputs, targets=None, choices=None):
    """A collated batch as the datasets make it (right-padded, eos after every text)."""
    tok, pad = model.tokenizer, model.pad_id

    def padded(seqs):
        width = max(len(s) for s in seqs)
        return torch.tensor([s + [pad] * (width - len(s)) for s in seqs])

    batch = {"input_ids": padded([tokenize(tok, t) for t in inputs])}
    if targets is not None:
        batch["target_ids"] = padded([tokenize(tok, t) for t in targets])
    if choices is not None:
        count = max(len(c) for c in choices)
        ids = [[tokenize(tok, c) for c in row] + [[pad]] * (count - len(row)) for row in choices]
        width = max(len(c) for row in ids for c in row)
        batch["answer_choices_ids"] = torch.tensor([[c + [pad] * (width - len(c)) for c in row] for row in ids])
    return batch


INPUTS = ["review : the soup was warm and the waiter was kind", "headline : team wins"]
CHOICES = [["positive", "negative"], ["sports", "business news today", "world"]]


# ----- architecture facts ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_architecture_facts_and_shortcuts(kind):
    model = model_of(kind)
    assert model.architecture == kind and model.interfaces is interfaces.CAUSAL
    linears = model.match_modules("decoder_linear")
    per_block = {"llama": 7, "gpt2": 4}[kind]
    assert len(linears) == per_block * TINY["layers"]
    assert all(isinstance(m, torch.nn.Linear) for m in linears.values())  # GPT-2's Conv1D became nn.Linear
    assert list(model.match_modules("decoder")) == [A.facts(kind).stacks[0]]
    assert len(model.match_modules("decoder_block")) == TINY["layers"]
    assert len(model.match_modules("decoder_final_ln")) == 1
    for name in linears:
        assert model.token_side(name) == "decoder"
        assert A.block_number(name, kind) in range(TINY["layers"])
        assert A.module_group(name, kind) in ("decoder self-attn", "decoder FFN")
        assert A.is_ffn(name, kind) == (".mlp." in name)
    assert sum(A.reads_model_width(n, kind) for n in linears) == TINY["layers"]
    with pytest.raises(NotImplementedError, match="no A1"):
        A.a1_router(kind)


def test_gpt2_conv1d_becomes_an_equal_linear():
    tokenizer = load_tokenizer()
    reference = gpt2_torch_model(len(tokenizer)).eval()
    ids = torch.tensor([tokenize(tokenizer, INPUTS[0])])
    expected = reference(input_ids=ids).logits
    model = model_of("gpt2")
    assert torch.allclose(model.torch_model(input_ids=ids).logits, expected, atol=1e-5)


# ----- LoRA -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_lora_on_decoder_only_linears_changes_outputs_and_trains(kind):
    model = model_of(kind)
    info = InterfaceInfo(interface="lm")
    batch = batch_of(model, INPUTS, ["positive", "sports"])
    before = model(batch, info)["loss"].item()
    modify_with_lora(model, lora_modules="lora_hosts", lora_layers="lora_children")
    loras = [m for m in model.torch_model.modules() if isinstance(m, LoRALinear)]
    assert len(loras) == {"llama": 7, "gpt2": 4}[kind] * TINY["layers"]
    assert model(batch, info)["loss"].item() == pytest.approx(before, abs=1e-6)  # B = 0: unchanged
    model.set_trainable_params("expert")
    params = [p for _, p in model.named_trainable_parameters()]
    assert params and all(n.endswith(("expert_lora_a", "expert_lora_b")) for n, _ in model.named_trainable_parameters())
    optimizer = torch.optim.Adam(params, lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(batch, info)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses
    with torch.no_grad():
        assert abs(model(batch, info)["loss"].item() - before) > 0.5


def test_lm_loss_is_on_the_target_tokens_only():
    model = model_of("llama")
    batch = batch_of(model, INPUTS, ["positive", "sports news"])
    loss = model(batch, InterfaceInfo(interface="lm"))["loss"]
    total, count = 0.0, 0
    for row in range(2):
        prompt = [t for t in batch["input_ids"][row].tolist() if t != model.pad_id]
        target = [t for t in batch["target_ids"][row].tolist() if t != model.pad_id]
        logits = model.torch_model(input_ids=torch.tensor([prompt + target])).logits[0]
        predicted = logits[len(prompt) - 1: len(prompt) + len(target) - 1]
        total += torch.nn.functional.cross_entropy(predicted, torch.tensor(target), reduction="sum").item()
        count += len(target)
    assert loss.item() == pytest.approx(total / count, abs=1e-5)


# ----- rank classification and generation -----------------------------------------------------------------------
def reference_choice_scores(model, batch, length_normalization):
    """Every choice scored by running input + choice whole, one sequence at a time."""
    scores = torch.full(batch["answer_choices_ids"].shape[:2], float("inf"))
    for row in range(scores.shape[0]):
        prompt = [t for t in batch["input_ids"][row].tolist() if t != model.pad_id]
        for c, choice in enumerate(batch["answer_choices_ids"][row].tolist()):
            choice = [t for t in choice if t != model.pad_id]
            if not choice:
                continue
            logits = model.torch_model(input_ids=torch.tensor([prompt + choice])).logits[0]
            predicted = logits[len(prompt) - 1: len(prompt) + len(choice) - 1]
            loss = torch.nn.functional.cross_entropy(predicted, torch.tensor(choice), reduction="sum")
            scores[row, c] = loss / len(choice) if length_normalization else loss
    return scores


def calls_of(module):
    calls = []
    def record(module, args, kwargs):  # GPT-2 passes input_ids by position, Llama by keyword
        calls.append((args[0] if args else kwargs["input_ids"]).shape)

    module.register_forward_pre_hook(record, with_kwargs=True)
    return calls


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("length_normalization", [True, False])
def test_mc_runs_the_prefix_once_and_equals_rerunning_each_choice(kind, length_normalization):
    model = model_of(kind)
    batch = batch_of(model, INPUTS, choices=CHOICES)
    info = InterfaceInfo(interface="mc", length_normalization=length_normalization)
    stack = model.module(A.facts(kind).stacks[0])
    calls = calls_of(stack)
    with torch.no_grad():
        out = model(batch, info)
        expected = reference_choice_scores(model, batch, length_normalization)
    # one pass over the prefixes (B rows), one over the choices (B x C rows, continuing the cached prefixes)
    assert calls[:2] == [batch["input_ids"].shape, torch.Size([6, batch["answer_choices_ids"].shape[2]])]
    assert torch.isinf(out["choice_scores"][0, 2])  # the padding choice
    finite = torch.isfinite(expected)
    assert torch.equal(finite, torch.isfinite(out["choice_scores"]))
    assert torch.allclose(out["choice_scores"][finite], expected[finite], atol=1e-5, rtol=0)
    assert torch.equal(out["prediction"], expected.argmin(dim=1))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_generation_with_the_cache_equals_generation_without(kind):
    model = model_of(kind)
    model.eos_id = -1  # a random model may write eos at once; here every row runs the 12 steps
    batch = batch_of(model, INPUTS + ["ok"])
    with torch.no_grad():
        cached = interfaces.greedy_generate(model, batch["input_ids"], 12, use_cache=True)
        plain = interfaces.greedy_generate(model, batch["input_ids"], 12, use_cache=False)
        out = model(batch, InterfaceInfo(interface="gen", max_gen_length=12))
    assert cached.shape[1] == 12 and torch.equal(cached, plain)
    # output_ids start with the token that wrote the first generated one (each prompt's eos), as T5's
    assert torch.equal(out["output_ids"][:, 1:], cached) and set(out["output_ids"][:, 0].tolist()) == {1}
    assert out["output_text"] == model.tokenizer.batch_decode(cached, skip_special_tokens=True)


def test_generation_stops_at_eos_and_pads_after_it():
    model = model_of("llama")
    eos = model.eos_id
    with torch.no_grad():  # make eos the argmax everywhere but for the first row's first step
        model.torch_model.lm_head.bias = torch.nn.Parameter(torch.zeros(model.torch_model.lm_head.out_features))
        model.torch_model.lm_head.bias[eos] = 1e4
        batch = batch_of(model, INPUTS)
        ids = interfaces.greedy_generate(model, batch["input_ids"], 10)
    assert ids.shape == (2, 1) and ids[:, 0].tolist() == [eos, eos]


# ----- routing on decoder-only ----------------------------------------------------------------------------------
def routed_model(arch_file, bindings=()):
    """The shipped tiny Llama-style base with the model gin of tiny_llama, two random experts and router vectors."""
    parse_gin(["colm/models/tiny_llama/t5.gin", f"colm/models/tiny_llama/{arch_file}"],
              ["M/MODEL/Model.device='cpu'", "M/MODEL/FFNExperts.topk_value=2", "M/MODEL/FFNExperts.normalize_topk=True",
               *bindings])
    model = registry.get_object("M/MODEL")
    extend_moe(model, num_new_experts=2)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for addon in model.addons["expert_lora"].values():
            # both factors from the seeded generator: extend_moe's own init draws from the global RNG, so the
            # experts' effect on the loss would depend on the tests run before (it varied 0.0017-0.048 by seed)
            addon.layer1.copy_(torch.randn(addon.layer1.shape, generator=generator) * 0.01)
            addon.layer2.copy_(torch.randn(addon.layer2.shape, generator=generator) * 0.5)
        for router in model.addons["router"].values():
            router.expert_embeddings.copy_(torch.randn(router.expert_embeddings.shape, generator=generator))
    return model


def test_a_routed_decoder_only_model_with_two_experts_routes_every_token():
    model = routed_model("moe_lora_rank16_a2.gin")
    assert model.architecture == "llama"
    routers = model.addons["router"]
    assert len(routers) == 7 * model.torch_model.config.num_hidden_layers and all(r.concatenate for r in routers.values())
    batch = batch_of(model, INPUTS, ["positive", "sports"], CHOICES)
    with torch.no_grad():
        loss = model(batch, InterfaceInfo(interface="lm"))["loss"]
        probs = model.global_hidden_dict[next(iter(routers.values())).write_key]
        lengths = (batch["input_ids"] != 0).sum(1) + (batch["target_ids"] != 0).sum(1)
        assert probs.shape == (2, int(lengths.max()), 2)  # one distribution per token
        scores = model(batch, InterfaceInfo(interface="mc"))["choice_scores"]
        expected = reference_choice_scores(model, batch, True)
        finite = torch.isfinite(expected)
        # random experts at 0.5 scale move the logits far from the base's: float rounding is larger, not the method
        assert torch.allclose(scores[finite], expected[finite], atol=1e-4, rtol=0)
        cached = interfaces.greedy_generate(model, batch["input_ids"], 8, use_cache=True)
        plain = interfaces.greedy_generate(model, batch["input_ids"], 8, use_cache=False)
        out = model(batch, InterfaceInfo(interface="gen", max_gen_length=8))
        steps = model.global_hidden_dict[next(iter(routers.values())).write_key + ("concatenated",)]
    assert torch.isfinite(loss) and torch.equal(cached, plain) and torch.equal(out["output_ids"][:, 1:], cached)
    # one routing step per token that wrote a generated one (the prompt's pass keeps its last token), as T5's
    assert len(steps) == cached.shape[1] and all(s.shape[:2] == (2, 1) for s in steps)
    from colm.procedures.analysis import routed_token_probs

    probs = routed_token_probs(batch, out, model.global_hidden_dict, model.pad_id, model.eos_id, model.architecture)
    assert len(probs) == len(routers) and all(p.shape[1] == 2 and p.shape[0] >= 2 for p in probs.values())
    # the experts matter: the same batch without them scores otherwise
    with torch.no_grad():
        model.set_trainable_params("none")
        for addon in model.addons["expert_lora"].values():
            addon.layer2.zero_()
        assert abs(model(batch, InterfaceInfo(interface="lm"))["loss"].item() - loss.item()) > 1e-3


def test_gate_training_on_decoder_only_gets_gradients():
    model = routed_model("moe_lora_rank16.gin", ['M/MODEL/FFNExperts.learn_input_gate="only_sigmoid"',
                                                 "M/MODEL/FFNExperts.topk_value=None",
                                                 'M/MODEL/Model.trainable_params="gate"'])
    batch = batch_of(model, INPUTS, ["positive", "sports"])
    loss = model(batch, InterfaceInfo(interface="lm"))["loss"]
    loss.backward()
    gates = [(n, p) for n, p in model.named_trainable_parameters()]
    # only the gates: not Llama's own mlp.gate_proj, nor the experts on it (train_gate.sh binds this "gate" shortcut)
    assert len(gates) == len(model.addons["expert_lora"]) and all(n.endswith("expert_input_gate") for n, _ in gates)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in gates)


def test_tiny_llama_gins_build_lists():
    from test_model_gins import init_calls

    os.environ.setdefault("EXP_NAME", "x")
    d = "colm/models/tiny_llama"
    build = ["M/MODEL/DECODER/watch_hiddens", "M/MODEL/DECODER/make_moe"]
    for arch in ("moe_lora_rank16", "moe_lora_rank16_a2", "moe_lora_rank16_single"):
        assert init_calls([f"{d}/t5.gin", f"{d}/{arch}.gin"]) == build
        assert init_calls([f"{d}/t5.gin", f"{d}/{arch}.gin", "colm/experiments/eval.gin"]) == build + ["M/MODEL/load_weights"]
    assert init_calls([f"{d}/t5.gin", "colm/models/moe_lora_rank16.gin"]) == ["M/MODEL/modify_with_lora"]
    assert module_names.to_regex("lora_children", "t5") == "q|k|v|o|w.*"
