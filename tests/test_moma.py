"""Addons, LoRA and weights: the mechanics every later stage stands on."""

import functools

import pytest
import torch
from torch import nn

from colm.formats.checkpoint_io import read_checkpoint
from colm.models.interfaces import choice_scores
from colm.moma.addons import Addon, insert_addon
from colm.moma.hiddens import watch_hiddens
from colm.moma.lora import LoRALinear, modify_with_lora
from colm.moma.weights import load_weights, save_weights

LORA = functools.partial(modify_with_lora, lora_modules=".*SelfAttention|.*EncDecAttention|.*DenseReluDense",
                         lora_layers="q|k|v|o|w.*")


class Recorder(Addon):
    has_pre_forward = has_post_forward = True

    def __init__(self, log, tag):
        super().__init__({}, "host")
        self.log, self.tag = log, tag

    def pre_forward(self, args, kwargs):
        self.log.append(f"pre-{self.tag}")

    def post_forward(self, args, kwargs, output):
        self.log.append(f"post-{self.tag}")


def test_addon_order_first_last_inner_outer():
    log = []
    host = nn.Linear(3, 3)
    insert_addon(host, "a", Recorder(log, "a"), "last")
    insert_addon(host, "b", Recorder(log, "b"), "first")
    insert_addon(host, "c", Recorder(log, "c"), "inner")
    insert_addon(host, "d", Recorder(log, "d"), "outer")
    host(torch.zeros(1, 3))
    assert log == ["pre-d", "pre-b", "pre-a", "pre-c", "post-c", "post-b", "post-a", "post-d"]
    assert any(k.startswith("_addons.a") for k in host.state_dict()) is False  # Recorder has no params
    with pytest.raises(ValueError, match="already hosts"):
        insert_addon(host, "a", Recorder(log, "a"), "last")


def test_addon_can_rewrite_input_and_output():
    class Double(Addon):
        has_pre_forward = has_post_forward = True

        def pre_forward(self, args, kwargs):
            return (args[0] * 2,), kwargs

        def post_forward(self, args, kwargs, output):
            return output + 1

    host = nn.Linear(2, 2, bias=False)
    x = torch.randn(4, 2)
    expected = host(x * 2) + 1
    insert_addon(host, "doubler", Double({}, "h"))
    with pytest.raises(ValueError, match="clashes"):
        insert_addon(host, "double", Double({}, "h"))
    torch.testing.assert_close(host(x), expected)


def test_lora_with_zero_b_leaves_outputs_unchanged(make_model):
    base, lora = make_model(), make_model([LORA])
    ids = torch.randint(3, 200, (2, 9))
    out_base = base.torch_model(input_ids=ids, decoder_input_ids=ids[:, :4]).logits
    out_lora = lora.torch_model(input_ids=ids, decoder_input_ids=ids[:, :4]).logits
    torch.testing.assert_close(out_base, out_lora)
    names = [n for n, m in lora.torch_model.named_modules() if isinstance(m, LoRALinear)]
    assert len(names) == 4 * 7 + 4 * 11  # tiny T5: 4 encoder blocks x 7 linears, 4 decoder blocks x 11


def test_loralinear_equals_dense_update():
    torch.manual_seed(1)
    linear = nn.Linear(12, 7)
    lora = LoRALinear(linear, d_bottleneck=4, init_scale=0.5)
    nn.init.normal_(lora.expert_lora_b)
    x = torch.randn(5, 3, 12)
    dense_w = linear.weight + lora.expert_lora_b @ lora.expert_lora_a / 4
    torch.testing.assert_close(lora(x), x @ dense_w.T + linear.bias, rtol=1e-5, atol=1e-5)


def test_save_then_load_round_trips_exactly(make_model, tmp_path):
    model = make_model([LORA], trainable_params="expert")
    for _, param in model.named_trainable_parameters():
        param.data.normal_()
    path = str(tmp_path / "best.pt")
    save_weights(model, weight_path=path, save_params=".*expert.*")
    saved = read_checkpoint(path)
    assert saved and all(k.endswith(("expert_lora_a", "expert_lora_b")) for k in saved)
    assert "encoder.block.0.layer.0.SelfAttention.q.expert_lora_a" in saved
    other = make_model([LORA])
    load_weights(other, weight_path=path)
    for key, value in saved.items():
        assert torch.equal(other.torch_model.state_dict()[key], value)
    safetensors_path = str(tmp_path / "best.safetensors")
    save_weights(model, weight_path=safetensors_path, save_params=".*expert.*")
    assert read_checkpoint(safetensors_path).keys() == saved.keys()


def test_load_refuses_wrong_keys_shapes_and_corrupt_files(make_model, tmp_path):
    model = make_model([LORA])
    bad_key = tmp_path / "bad_key.pt"
    torch.save({"encoder.block.0.nothing_here": torch.zeros(2)}, bad_key)
    with pytest.raises(KeyError, match="nothing_here"):
        load_weights(model, weight_path=str(bad_key))
    bad_shape = tmp_path / "bad_shape.pt"
    torch.save({"encoder.block.0.layer.0.SelfAttention.q.expert_lora_a": torch.zeros(3, 3)}, bad_shape)
    with pytest.raises(ValueError, match="wrong shape"):
        load_weights(model, weight_path=str(bad_shape))
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="corrupt.pt"):
        load_weights(model, weight_path=str(corrupt))
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_weights(model, weight_path=str(tmp_path / "missing.pt"))


def test_interrupted_save_keeps_the_old_file(make_model, tmp_path, monkeypatch):
    model = make_model([LORA])
    path = str(tmp_path / "best.pt")
    save_weights(model, weight_path=path, save_params=".*expert.*")
    before = (tmp_path / "best.pt").read_bytes()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_weights(model, weight_path=path, save_params=".*expert.*")
    assert (tmp_path / "best.pt").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]


def test_expose_hidden_reductions(make_model):
    model = make_model()
    watch_hiddens(model, expose_hidden_modules="encoder_linear")
    assert len(model.addons["expose_hiddens"]) == 4 * 7
    name = "encoder.block.0.layer.0.SelfAttention.q"
    expose = model.addons["expose_hiddens"][name]
    captured = {}
    model.module(name).register_forward_pre_hook(lambda module, args: captured.update(x=args[0]))
    ids = torch.tensor([[5, 6, 7, 1], [8, 1, 0, 0]])
    expected = {
        None: lambda x: x,
        "mean": lambda x: x.mean(1),
        "masked_mean": lambda x: torch.stack([x[0].mean(0), x[1, :2].mean(0)]),
        "masked_select": lambda x: torch.cat([x[0], x[1, :2]]),
    }
    for reduction, reference in expected.items():
        expose.reduction_method = reduction
        model.torch_model.get_encoder()(input_ids=ids, attention_mask=(ids != 0).long())
        hidden = model.global_hidden_dict[("hidden_states", "expose_hiddens", name)]
        torch.testing.assert_close(hidden, reference(captured["x"]), rtol=1e-4, atol=1e-5)


def _mc_batch(model, inputs, choices):
    from colm.datasets.dataset import tokenize

    tok = model.tokenizer
    ids = [tokenize(tok, [s]) for s in inputs]
    length = max(map(len, ids))
    input_ids = torch.tensor([i + [0] * (length - len(i)) for i in ids])
    chosen = [[tokenize(tok, [c]) for c in row] for row in choices]
    t = max(len(c) for row in chosen for c in row)
    c_max = max(map(len, chosen))
    rows = []
    for row in chosen:
        row = row + [[0]] * (c_max - len(row))
        rows.append([c + [0] * (t - len(c)) for c in row])
    return {"input_ids": input_ids, "answer_choices_ids": torch.tensor(rows)}


def test_rank_classification_equals_scoring_each_choice_separately(make_model):
    from colm.datasets.dataset import InterfaceInfo

    model = make_model()
    model.eval()
    info = InterfaceInfo(interface="mc", length_normalization=True)
    batch = _mc_batch(model, ["abc", "hello there"], [["yes", "no", "maybe"], ["x", "longer answer"]])
    with torch.no_grad():
        out = model(batch, info)
        scores = out["choice_scores"]
        assert torch.isinf(scores[1, 2])  # padding choice
        for b in range(2):
            for c in range(2 if b else 3):
                target = batch["answer_choices_ids"][b, c]
                labels = target[target != 0].unsqueeze(0)
                ids = batch["input_ids"][b : b + 1]
                ids = ids[:, : int((ids != 0).sum())]
                loss = model.torch_model(input_ids=ids, labels=labels).loss  # mean token CE
                torch.testing.assert_close(scores[b, c], loss, rtol=1e-4, atol=1e-4)
    assert out["prediction"].tolist() == scores.argmin(dim=1).tolist()


def test_rank_classification_without_length_normalisation_sums(make_model):
    from colm.datasets.dataset import InterfaceInfo

    model = make_model()
    model.eval()
    batch = _mc_batch(model, ["abc"], [["yes", "nope"]])
    with torch.no_grad():
        summed = choice_scores(model, batch, InterfaceInfo(interface="mc", length_normalization=False))
        normed = choice_scores(model, batch, InterfaceInfo(interface="mc", length_normalization=True))
    lengths = torch.tensor([float(len(model.tokenizer(c).input_ids)) for c in ("yes", "nope")])  # with </s>
    assert lengths[1] > lengths[0]  # "nope" is not one token of the embedded vocabulary: the lengths differ
    torch.testing.assert_close(normed[0], summed[0] / lengths, rtol=1e-4, atol=1e-5)
