"""Routing output (RoutingDistribution, EntropyDistribution) and the routing diagnosis, on routing with known
numbers: hand-built router outputs, hand-written routing files, and one pass of a tiny routed model."""

import json
import os
import runpy
from collections import OrderedDict

import numpy as np
import pytest
import torch

from colm.formats.experts_file import read_experts_file, write_experts_file
from colm.models import architecture
from colm.procedures import analysis
from colm.procedures import routing_analysis as ra
from colm.procedures.analysis import (
    EntropyDistribution,
    RoutingDistribution,
    load_routing_distribution,
    resolve_expert_names,
    save_routing_distribution,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENC = "encoder.block.0.layer.0.SelfAttention.q"
DEC = "decoder.block.0.layer.0.SelfAttention.q"
PAD, EOS = 0, 1


class FakeModel:
    pad_id, eos_id, architecture = PAD, EOS, "t5"


def fake_batch(seed):
    """Two examples with known tokens that count: encoder tokens by mask (3 + 2), decoder tokens by generation
    (ex. 0 stops at eos on step 2: 2 tokens; ex. 1 produces eos on step 3: 3 tokens)."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 0, 0]])
    enc_scores = torch.randn(2, 4, 3, generator=gen) * 2
    steps = [torch.randn(2, 1, 3, generator=gen) * 2 for _ in range(3)]
    shared = {("mask", "prepare_mask", "encoder"): mask / mask.sum(1, keepdim=True),
              ("routing_weights", "router", ENC): torch.softmax(enc_scores, -1),
              ("router_scores", "router", ENC): enc_scores,
              ("routing_weights", "router", DEC): torch.softmax(steps[-1], -1),
              ("router_scores", "router", DEC): steps[-1],
              ("routing_weights", "router", DEC, "concatenated"): [torch.softmax(s, -1) for s in steps],
              ("router_scores", "router", DEC, "concatenated"): steps}
    outputs = {"output_ids": torch.tensor([[PAD, 5, EOS, PAD], [PAD, 6, 7, EOS]])}
    counted = {ENC: enc_scores[mask > 0],
               DEC: torch.cat([torch.cat(steps, 1)[0, :2], torch.cat(steps, 1)[1, :3]])}
    return {"input_str": ["a", "b"]}, outputs, shared, counted


def expected_stats(score_rows):
    scores = torch.cat(score_rows).double()
    probs = torch.softmax(scores, -1)
    return {"mean_probs": probs.mean(0).numpy(), "tokens": scores.shape[0],
            "top1_counts": np.bincount(probs.argmax(-1).numpy(), minlength=3),
            "mean_scores": scores.mean(0).numpy(),
            "mean_score_variance": float(scores.var(-1, correction=0).mean())}


def test_routing_distribution_statistics_file_and_heatmaps(tmp_path):
    write_experts_file(str(tmp_path), OrderedDict([("ToyA", "TOYA"), ("ToyB", "TOYB"), ("ToyC", "TOYC")]))
    processor = RoutingDistribution(save_dir=str(tmp_path / "routing_distribution"))
    counted = {ENC: [], DEC: []}
    for dataset, seeds in (("D/TOYA/EVAL", (0, 1)), ("D/TOYB/EVAL", (2,))):
        rows = {ENC: [], DEC: []}
        for seed in seeds:
            batch, outputs, shared, picked = fake_batch(seed)
            processor.batch_process(batch, outputs, shared, FakeModel())
            for m in rows:
                rows[m].append(picked[m])
        processor.dataset_process(dataset)
        counted[dataset] = rows
    processor.cross_dataset_process()

    out = tmp_path / "routing_distribution"
    loaded = load_routing_distribution(str(out / "D_TOYA_EVAL.safetensors"))
    assert loaded["dataset"] == "D/TOYA/EVAL"
    assert loaded["experts"] == ["ToyA", "ToyB", "ToyC"]
    assert list(loaded["modules"]) == [ENC, DEC]  # model order kept
    for module, tokens in ((ENC, 10), (DEC, 10)):  # two batches of 5 counted tokens each
        got, want = loaded["modules"][module], expected_stats(counted["D/TOYA/EVAL"][module])
        assert got["tokens"] == want["tokens"] == tokens
        np.testing.assert_array_equal(got["top1_counts"], want["top1_counts"])
        for key in ("mean_probs", "mean_scores"):
            np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-7)
        assert got["mean_score_variance"] == pytest.approx(want["mean_score_variance"], rel=1e-6)
    for name in ("D_TOYA_EVAL.png", "D_TOYB_EVAL.png", "task_by_expert_encoder.png", "task_by_expert_decoder.png"):
        assert (out / name).stat().st_size > 1000
    assert not list(out.glob("*.pickle"))
    # The summary matrix: one row per dataset, the mean over that side's modules.
    tasks, matrix = analysis.task_by_expert({d: processor.results[d] for d in processor.results}, "encoder")
    assert tasks == ["D/TOYA/EVAL", "D/TOYB/EVAL"]
    np.testing.assert_allclose(matrix[1], expected_stats(counted["D/TOYB/EVAL"][ENC])["mean_probs"], rtol=1e-6)


def test_expert_names_resolution(tmp_path):
    assert resolve_expert_names(None, 3, str(tmp_path / "missing.json")) == ["0", "1", "2"]
    path = write_experts_file(str(tmp_path), OrderedDict([("X", "SX"), ("Y", "SY")]))
    assert resolve_expert_names(None, 2, path) == ["X", "Y"]
    assert resolve_expert_names(["p", "q"], 2, path) == ["p", "q"]
    with pytest.warns(UserWarning, match="2 expert names for 3 experts"):
        assert resolve_expert_names(None, 3, path) == ["0", "1", "2"]
    assert read_experts_file(path)[1] == {"index": 1, "name": "Y", "scope": "SY"}
    (tmp_path / "bad.json").write_text('{"experts": [{"index": 1, "name": "Y"}]}')
    with pytest.raises(ValueError, match="indices must be 0..0"):
        read_experts_file(str(tmp_path / "bad.json"))


def test_load_routing_distribution_refuses_other_files(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(FileNotFoundError, match="RoutingDistribution"):
        load_routing_distribution(str(tmp_path / "none.safetensors"))
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="format None"):
        load_routing_distribution(str(tmp_path / "other.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable routing distribution"):
        load_routing_distribution(str(tmp_path / "junk.safetensors"))


def test_entropy_distribution_writes_json(tmp_path):
    processor = EntropyDistribution(save_dir=str(tmp_path))
    shared = {("mask", "prepare_mask", "encoder"): torch.ones(1, 3) / 3,
              ("routing_weights", "router", ENC): torch.full((1, 3, 4), 0.25)}  # uniform over 4: 2 bits
    processor.batch_process({}, {}, shared, FakeModel())
    processor.dataset_process("D/X/EVAL")
    with open(tmp_path / "D_X_EVAL.json") as f:
        assert json.load(f) == {ENC: pytest.approx(2.0)}
    assert not list(tmp_path.glob("*.pickle"))


# ----- the diagnosis on hand-written routing files ---------------------------------------------------------------

EXPERTS = OrderedDict([("ToyReverse", "TOYREVERSE"), ("ToySort", "TOYSORT"), ("ToyDouble", "TOYDOUBLE")])
HELD_IN = ["D/TOYREVERSE/EVAL", "D/TOYSORT/EVAL", "D/TOYDOUBLE/EVAL"]
HELD_OUT = "D/TOYREVERSELONG/EVAL"
M = {"enc_q": "encoder.block.0.layer.0.SelfAttention.q", "enc_ffn": "encoder.block.0.layer.1.DenseReluDense.wi",
     "dec_q": "decoder.block.0.layer.0.SelfAttention.q", "cross_q": "decoder.block.0.layer.1.EncDecAttention.q",
     "cross_k": "decoder.block.0.layer.1.EncDecAttention.k", "dec_ffn": "decoder.block.0.layer.2.DenseReluDense.wo"}
TOKENS = {HELD_IN[0]: 10, HELD_IN[1]: 30, HELD_IN[2]: 20, HELD_OUT: 40}
# enc_q: mean scores and mean across-expert score variance per dataset.
SCORES = {HELD_IN[0]: ([1.0, -1.0, 0.0], 4 / 3), HELD_IN[1]: ([0.0, 2.0, 1.0], 1.0),
          HELD_IN[2]: ([2.0, 2.0, 2.0], 0.5), HELD_OUT: ([3.0, 0.0, 0.0], 6.0)}


def mass(module, row, dataset):
    if module == "enc_q":  # each held-in task on its own expert; the held-out task mostly on expert 0
        return [0.7 if j == row else 0.15 for j in range(3)] if row < 3 else [0.5, 0.3, 0.2]
    if module == "enc_ffn":  # every task to ToyDouble: collapsed
        return [0.2, 0.2, 0.6]
    if module == "dec_q":  # 3 of 4 tasks to ToySort: 75%, not above the 80% threshold
        return [0.2, 0.5, 0.3] if row < 3 else [0.6, 0.2, 0.2]
    return [0.3, 0.3, 0.4] if row % 2 else [0.4, 0.3, 0.3]


@pytest.fixture
def routing_dir(tmp_path):
    exp = tmp_path / "exp"
    write_experts_file(str(exp), EXPERTS)
    directory = exp / "routing_distribution"
    for row, dataset in enumerate(HELD_IN + [HELD_OUT]):
        modules = OrderedDict()
        for short, module in M.items():
            stats = {"mean_probs": mass(short, row, dataset), "top1_counts": [1, 2, 3], "tokens": TOKENS[dataset]}
            if short == "enc_q":
                stats["mean_scores"], stats["mean_score_variance"] = SCORES[dataset]
            modules[module] = stats
        save_routing_distribution(str(directory / (dataset.replace("/", "_") + ".safetensors")), dataset, modules,
                                  list(EXPERTS))
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(16, generator=gen)
    state = {}
    for short, module in M.items():
        vectors = [a, 3 * a + 2, -a] if short == "enc_q" else [torch.randn(16, generator=gen) for _ in range(3)]
        for i, v in enumerate(vectors):
            state[f"{module}._addons.router.expert_embeddings__{i}"] = v
            state[f"{module}._addons.expert_lora.layer1__{i}"] = torch.zeros(16, 2)
    torch.save(state, exp / "best.pt")
    return directory


def test_diagnosis_numbers(routing_dir):
    paths = ra.run_routing_diagnosis(str(routing_dir))
    with open(paths["json"]) as f:
        d = json.load(f)
    assert d["own_expert"] == {**dict(zip(HELD_IN, EXPERTS)), HELD_OUT: None}
    assert d["datasets"] == sorted(HELD_IN + [HELD_OUT])
    enc_q, enc_ffn, dec_q = (d["modules"][M[k]] for k in ("enc_q", "enc_ffn", "dec_q"))
    assert enc_q["group"] == "encoder self-attn" and dec_q["group"] == "decoder self-attn"
    assert {m["group"] for m in d["modules"].values()} == set(architecture.module_groups())
    assert enc_q["own_mass"] == {t: pytest.approx(0.7) for t in HELD_IN}
    row = enc_q["tasks"].index(HELD_OUT)
    assert enc_q["mass"][row] == pytest.approx([0.5, 0.3, 0.2])
    assert not enc_q["collapsed"] and enc_q["top_expert_share"] == pytest.approx(0.5)
    assert enc_ffn["collapsed"] and enc_ffn["most_common_top_expert"] == "ToyDouble"
    assert not dec_q["collapsed"] and dec_q["top_expert_share"] == pytest.approx(0.75)
    # Common-score fraction: Var_e(mean scores) / mean score variance, per task and pooled over tokens.
    for task, (means, variance) in SCORES.items():
        assert enc_q["common_score_fraction_per_task"][task] == pytest.approx(np.var(means) / variance, abs=1e-6)
    assert enc_q["common_score_fraction_per_task"][HELD_IN[2]] == 0  # a pure shift: no spread at all
    weights = np.array([TOKENS[t] for t in SCORES])
    pooled_means = np.average([SCORES[t][0] for t in SCORES], axis=0, weights=weights)
    pooled_variance = np.average([SCORES[t][1] for t in SCORES], weights=weights)
    assert enc_q["common_score_fraction"] == pytest.approx(np.var(pooled_means) / pooled_variance, abs=1e-6)
    assert dec_q["common_score_fraction"] is None  # no scores recorded there
    # Gate similarity: g1 = 3 g0 + 2 standardises to g0 (cosine 1), g2 = -g0 (cosine -1).
    gates = enc_q["gate_cosine"]
    assert gates["max"] == pytest.approx(1.0, abs=1e-4) and gates["mean"] == pytest.approx(-1 / 3, abs=1e-4)
    assert gates["most_similar_pair"] == ["ToyReverse", "ToySort"]
    assert np.asarray(gates["matrix"]) == pytest.approx(np.array([[1, 1, -1], [1, 1, -1], [-1, -1, 1]]), abs=1e-4)
    # Groups.
    groups = d["groups"]
    assert groups["encoder self-attn"]["own_expert_mass"] == pytest.approx(0.7)
    assert groups["encoder FFN"]["own_expert_mass"] == pytest.approx((0.2 + 0.2 + 0.6) / 3)
    assert groups["encoder FFN"]["collapsed_modules"] == 1 and groups["encoder FFN"]["collapsed_to"] == {"ToyDouble": 1}
    assert groups["decoder self-attn"]["collapsed_modules"] == 0
    # Sides: encoder side = encoder linears and cross-attention k; ToyReverse's own mass averaged over them.
    encoder = d["sides"]["encoder"]
    assert encoder["own_mass"]["D/TOYREVERSE/EVAL"] == pytest.approx((0.7 + 0.2 + 0.4) / 3)
    decoder = d["sides"]["decoder"]
    assert decoder["own_mass"]["D/TOYSORT/EVAL"] == pytest.approx((0.5 + 0.3 + 0.3) / 3)
    text = open(paths["markdown"]).read()
    assert "| encoder self-attn | 1 | 0.700 | 0 | - |" in text
    assert "| encoder FFN | 1 | 0.333 | 1 | ToyDouble (1) |" in text
    assert "| D/TOYREVERSE/EVAL | ToyReverse | 0.433 |" in text
    for side in ("encoder", "decoder"):
        assert os.path.getsize(paths[side]) > 1000


def test_diagnosis_cli_own_expert_mapping_and_errors(routing_dir, tmp_path, capsys):
    cli = runpy.run_path(os.path.join(REPO_ROOT, "scripts/analyze_routing.py"))
    out = tmp_path / "diag"
    assert cli["main"]([str(routing_dir), "--no_checkpoint", "--out_dir", str(out),
                        "--own_expert", f"{HELD_OUT}=ToyReverse", "D/TOYSORT/EVAL=2"]) == 0
    assert "| encoder self-attn |" in capsys.readouterr().out
    with open(out / ra.OUTPUT_FILES["json"]) as f:
        d = json.load(f)
    assert d["own_expert"][HELD_OUT] == "ToyReverse" and d["own_expert"]["D/TOYSORT/EVAL"] == "ToyDouble"
    assert d["modules"][M["enc_q"]]["own_mass"][HELD_OUT] == pytest.approx(0.5)
    assert "gate_cosine" not in d["modules"][M["enc_q"]]
    assert cli["main"]([str(routing_dir), "--own_expert", "D/TOYSORT/EVAL=Nobody"]) == 1
    assert "no expert named 'Nobody'" in capsys.readouterr().err
    assert cli["main"]([str(routing_dir), "--own_expert", "justaname"]) == 1
    assert cli["main"]([str(tmp_path / "nowhere")]) == 1
    assert "RoutingDistribution" in capsys.readouterr().err


def test_diagnosis_refuses_mismatched_experts(routing_dir, tmp_path):
    write_experts_file(str(tmp_path), OrderedDict([("A", "SA"), ("B", "SB")]))
    with pytest.raises(ValueError, match="names 2 experts but the routing output has 3"):
        ra.run_routing_diagnosis(str(routing_dir), experts_file=str(tmp_path / "experts.json"))


def test_module_groups_and_dataset_stems():
    assert architecture.module_group("decoder.block.3.layer.1.EncDecAttention.v") == "cross-attn k/v"
    assert architecture.module_group("decoder.block.3.layer.1.EncDecAttention.o") == "cross-attn q/o"
    assert architecture.module_group("encoder.block.11.layer.1.DenseReluDense.wi_0") == "encoder FFN"
    assert architecture.module_group("decoder") == "other"
    assert ra.dataset_stem("D/FLANV2ZSBOOLQ/ZS/EVAL") == "FLANV2ZSBOOLQ/ZS"
    assert ra.dataset_stem("D/TOYREVERSE/TRAIN") == "TOYREVERSE"


# ----- one pass of a tiny routed model ---------------------------------------------------------------------------


def test_routing_distribution_on_a_routed_model(tmp_path):
    from colm import registry
    from colm.datasets.dataset import InterfaceInfo
    from colm.ginparse import parse_gin
    from colm.moma.moe import extend_moe

    # the A2 gin builds the MoE; nothing loaded (its build list alone)
    parse_gin(["colm/models/tiny/t5.gin", "colm/models/tiny/moe_lora_rank16_a2.gin"],
              ["M/MODEL/FFNExperts.topk_value=2", "M/MODEL/FFNExperts.normalize_topk=True", "M/MODEL/Model.device='cpu'"])
    model = registry.get_object("M/MODEL")
    extend_moe(model, num_new_experts=3)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for router in model.addons["router"].values():
            router.expert_embeddings.copy_(torch.randn(router.expert_embeddings.shape, generator=gen))
    model.eval()
    ids = torch.randint(3, 250, (3, 9), generator=gen)
    ids[0, 6:] = model.pad_id
    processor = RoutingDistribution(save_dir=str(tmp_path))
    with torch.no_grad():
        outputs = model({"input_ids": ids}, InterfaceInfo(interface="gen", max_gen_length=6))
    processor.batch_process({"input_ids": ids}, outputs, model.global_hidden_dict, model)
    processor.dataset_process("D/X/EVAL")
    loaded = load_routing_distribution(str(tmp_path / "D_X_EVAL.safetensors"))
    produced = outputs["output_ids"][:, 1:]
    generated = 0
    for row in produced.tolist():
        generated += row.index(model.eos_id) + 1 if model.eos_id in row else len(row)
    assert set(loaded["modules"]) == set(model.addons["router"])
    for module, stats in loaded["modules"].items():
        encoder_tokens = architecture.token_side(module) == "encoder"
        expected_tokens = int((ids != model.pad_id).sum()) if encoder_tokens else generated
        assert stats["tokens"] == expected_tokens, module
        assert stats["top1_counts"].sum() == stats["tokens"]
        assert stats["mean_probs"].sum() == pytest.approx(1.0)
        # The across-expert variance of the mean scores never exceeds the mean per-token variance.
        assert 0 < np.var(stats["mean_scores"]) <= stats["mean_score_variance"] + 1e-12


def test_sentence_level_routing_without_scores(tmp_path):
    """Retrieval routing: one one-hot row per example on the whole-encoder router, and no scores."""
    processor = RoutingDistribution(save_dir=str(tmp_path))
    shared = {("routing_weights", "router", "encoder"): torch.eye(3)[[2, 2, 0]]}
    processor.batch_process({}, {}, shared, FakeModel())
    processor.dataset_process("D/TOYA/EVAL")
    stats = load_routing_distribution(str(tmp_path / "D_TOYA_EVAL.safetensors"))["modules"]["encoder"]
    assert stats["tokens"] == 3 and "mean_scores" not in stats
    np.testing.assert_allclose(stats["mean_probs"], [1 / 3, 0, 2 / 3])
    np.testing.assert_array_equal(stats["top1_counts"], [1, 0, 2])
    d = ra.diagnose(ra.load_routing_dir(str(tmp_path)))
    assert d["modules"]["encoder"]["common_score_fraction"] is None
    assert d["modules"]["encoder"]["group"] == "other"


def test_run_concatenate_writes_expert_names(tmp_path, monkeypatch):
    from colm.checkpoints import concatenate as C
    from colm.formats import layout
    from colm.formats.checkpoint_io import write_checkpoint

    monkeypatch.setattr(layout, "EXP_OUT", str(tmp_path))
    names = ["ToySummary", "ToyReverse", "MyTask:MYSCOPE"]
    m = "encoder.block.0.layer.0.SelfAttention.q"
    for name in ("ToySummary", "ToyReverse", "MyTask"):
        state = {f"{m}._addons.expert_lora.layer1__0": torch.zeros(4, 2),
                 f"{m}._addons.expert_lora.layer2__0": torch.zeros(2, 4),
                 f"{m}._addons.router.expert_embeddings__0": torch.ones(4)}
        write_checkpoint(state, str(tmp_path / layout.expert_path(name, "lora") / "best.pt"))
    C.run_concatenate(datasets=names, suffix="lora", out_path="Cat")
    entries = read_experts_file(str(tmp_path / "Cat" / "experts.json"))
    assert [(e["index"], e["name"], e["scope"]) for e in entries] == [
        (0, "ToySummary", "TOYSUMMARY"), (1, "ToyReverse", "TOYREVERSE"), (2, "MyTask", "MYSCOPE")]
