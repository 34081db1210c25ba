"""Retrieval baseline: the embedder, the FeatureExtractor text, the Retriever's libraries, retrieval routing in
the model, and the three launcher modes on the tiny model."""

import os
import subprocess

import numpy as np
import pytest
import torch
from conftest import subprocess_env

from colm import registry
from colm.checkpoints.retrieval import make_checkpoint_for_retrieval_state
from colm.datasets.dataset import InterfaceInfo
from colm.formats import keys as K
from colm.formats.checkpoint_io import read_checkpoint, write_checkpoint
from colm.formats.layout import retrieval_library_file
from colm.ginparse import parse_gin
from colm.main import main
from colm.models.hf_loading import hf_torch_model
from colm.models.module_names import match_modules
from colm.moma.embedder import embed_texts
from colm.moma.feature_extractor import FeatureExtractor, batch_texts
from colm.procedures.analysis import load_routing_distribution
from colm.procedures.results import read_results
from colm.procedures.retriever import Retriever, library_indices, train_scope
from colm.utils.coerce import as_bool

TINY_T5 = "colm/models/tiny/toy_t5"
SCRIPT = "colm/experiments/bash_scripts/retriever.sh"
TOY3 = '["ToySentiment", "ToyReverse", "ToyDiagnosis"]'
TOY3_EVAL = ["D/TOYSENTIMENT/EVAL", "D/TOYREVERSE/EVAL", "D/TOYDIAGNOSIS/EVAL"]


def expert_state(n_experts, seed=0):
    """Random rank-16 LoRA experts for every linear of the tiny T5, in the original's key layout."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, linear in match_modules(hf_torch_model(TINY_T5), ["encoder_linear", "decoder_linear"]).items():
        for i in range(n_experts):
            state[K.layer1_key(name, i)] = torch.randn(linear.in_features, 16, generator=generator) * 0.3
            state[K.layer2_key(name, i)] = torch.randn(16, linear.out_features, generator=generator) * 0.3
            state[K.router_key(name, i)] = torch.randn(linear.in_features, generator=generator)
    return state


# ---- text and flags -----------------------------------------------------------------------------------------


def test_include_answer_choices_is_a_real_boolean():
    assert as_bool("False", "x") is False and as_bool("True", "x") is True
    assert as_bool(False, "x") is False and as_bool(True, "x") is True
    assert FeatureExtractor({}, "encoder", ("k",), include_answer_choices="False").include_answer_choices is False
    with pytest.raises(ValueError, match="FeatureExtractor.include_answer_choices must be True or False"):
        FeatureExtractor({}, "encoder", ("k",), include_answer_choices="no")


def test_answer_choices_are_taken_per_example():
    batch = {"input_str": ["is it red?", "say hi", "pick one"], "answer_choices": [["yes", "no"], [], ["a", "b", "c"]]}
    assert batch_texts(batch, True) == ["Answer Choices: yes, no, Instance: is it red?",
                                        "Answer Choices: None, Instance: say hi",
                                        "Answer Choices: a, b, c, Instance: pick one"]
    assert batch_texts(batch, False) == batch["input_str"]
    assert batch_texts({"input_str": ["x"]}, True) == ["Answer Choices: None, Instance: x"]


# ---- the embedder -------------------------------------------------------------------------------------------


def test_embeddings_are_unit_norm_and_batching_changes_nothing():
    texts = ["The cat sat on the mat.", "Quarks combine into hadrons.", "ok", "A much longer sentence " * 30]
    batched = embed_texts(texts, batch_size=3)
    assert batched.shape == (4, 384) and batched.dtype == torch.float32
    torch.testing.assert_close(batched.norm(dim=1), torch.ones(4))
    one_by_one = torch.cat([embed_texts([t]) for t in texts])
    torch.testing.assert_close(batched, one_by_one, atol=1e-5, rtol=1e-4)
    with pytest.raises(TypeError, match="list of strings"):
        embed_texts("one string")


# ---- routing in the model -----------------------------------------------------------------------------------

LIBRARIES = [
    ["Preheat the oven and bake the bread for forty minutes.", "Chop the onions and fry them in butter."],
    ["The telescope revealed a distant spiral galaxy.", "Jupiter has dozens of moons.",
     "A comet's tail points away from the sun."],
    ["The striker scored twice in the second half.", "The tennis match went to a fifth set."],
]


def test_retrieval_router_picks_the_expert_holding_a_near_duplicate(tmp_path):
    libraries = [embed_texts(sentences) for sentences in LIBRARIES]  # 2, 3 and 2 rows: zero padding to 3
    state = make_checkpoint_for_retrieval_state(expert_state(3), libraries)
    assert state["encoder._addons.router.expert_embeddings__0"].shape == (3 * 384,)
    write_checkpoint(state, str(tmp_path / "best.pt"))
    # the model gin builds the retrieval MoE; the checkpoint is what the experiment adds (eval.gin does the same)
    parse_gin(["colm/models/tiny/t5.gin", "colm/models/tiny/moe_lora_retriever.gin"],
              ["M/MODEL/moma_calls.experts=[@M/MODEL/load_weights]",
               f'M/MODEL/load_weights.weight_path="{tmp_path}/best.pt"', "retrieval_router_size.library_rows=3",
               "M/MODEL/FeatureExtractor.include_answer_choices=False", 'M/MODEL/Model.device="cpu"'])
    model = registry.get_object("M/MODEL")
    router = model.addons["router"]["encoder"]
    experts = model.addons["expert_lora"]
    assert len(experts) == 72 and any(name.startswith("decoder") for name in experts)
    assert all(e.link is router.link and e.read_key == router.write_key for e in experts.values())

    queries = ["Jupiter has many dozens of moons.", "The tennis match went to five sets.",
               "Chop an onion and fry it in butter."]
    ids = model.tokenizer(queries, return_tensors="pt", padding=True).input_ids
    batch = {"input_ids": ids, "input_str": queries, "answer_choices": [[], [], []]}
    with torch.no_grad():
        model.eval()(batch, InterfaceInfo(interface="gen", max_gen_length=4))
    weights = model.global_hidden_dict[router.write_key]
    assert torch.equal(weights, torch.eye(3)[[1, 2, 0]])


# ---- the Retriever procedure --------------------------------------------------------------------------------


def test_libraries_on_disk_and_the_diagnostic(in_tmp_repo):
    parse_gin(["colm/datasets/toy.gin", "colm/experiments/retriever.gin"],
              ['P/RETRIEVE/Retriever.datasets=["D/TOYSENTIMENT/TRAIN", "D/TOYREVERSE/TRAIN"]',
               "P/RETRIEVE/Retriever.dataset_length=25", 'P/RETRIEVE/Retriever.expert_library_dir="exp_out/lib"'])
    (retriever,) = main()
    written = retriever.run_in_scope()  # run again: same files, written atomically over the old ones
    sentiment = registry.get_object("D/TOYSENTIMENT/TRAIN")
    path = retrieval_library_file("lib", "TOYSENTIMENT", 25)
    assert written == {"D/TOYSENTIMENT/TRAIN": path, "D/TOYREVERSE/TRAIN": retrieval_library_file("lib", "TOYREVERSE", 25)}
    assert sorted(os.listdir("exp_out/lib")) == ["D_TOYREVERSE_TRAIN_K25_embeddings.npy",
                                                 "D_TOYSENTIMENT_TRAIN_K25_embeddings.npy"]
    matrix = np.load(path)
    assert matrix.shape == (25, 384) and matrix.dtype == np.float32
    indices = library_indices(len(sentiment), 25, seed=42)
    assert len(sentiment) == 1000 and indices == sorted(set(indices)) and indices != list(range(25))
    first = sentiment.get_example(indices[0])
    text = f"Answer Choices: negative, positive, Instance: {first['input_str']}"
    torch.testing.assert_close(torch.from_numpy(matrix[0]), embed_texts([text])[0], atol=1e-5, rtol=1e-4)

    eval_sets = [registry.get_object(name) for name in ("D/TOYSENTIMENT/EVAL", "D/TOYREVERSE/EVAL")]
    diagnostic = Retriever("P/RETRIEVE/DIAGNOSE", datasets=eval_sets, include_answer_choices="True",
                           make_expert_library="False", expert_library_dir="exp_out/lib", dataset_length=20)
    votes = diagnostic.run()
    assert votes["D/TOYSENTIMENT/EVAL"]["library"] == "D_TOYSENTIMENT_TRAIN"
    assert votes["D/TOYREVERSE/EVAL"]["library"] == "D_TOYREVERSE_TRAIN"
    with pytest.raises(ValueError, match="D/<scope>/TRAIN"):
        train_scope("D/TOYREVERSE/EVAL")


# ---- the launcher, all three modes --------------------------------------------------------------------------


def launch(cwd, *flags):
    done = subprocess.run(["bash", SCRIPT, *flags], cwd=cwd, env=subprocess_env(cwd), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_launcher_library_checkpoint_and_evaluation(in_tmp_repo):
    write_checkpoint(expert_state(3), str(in_tmp_repo / "exp_out/ToyA2_tiny_lora_concatenated/best.pt"))
    common = ["-dataset_setting", TOY3, "-dataset_length", "40"]
    launch(in_tmp_repo, "-make_expert_library", "True", *common)
    library = in_tmp_repo / "exp_out/elm_40_ans_minlm"
    assert sorted(os.listdir(library)) == [f"D_{s}_TRAIN_K40_embeddings.npy"
                                           for s in ("TOYDIAGNOSIS", "TOYREVERSE", "TOYSENTIMENT")]

    out = "ToyCompleteansretrieval_tiny_lora_concatenated"
    launch(in_tmp_repo, "-create_checkpoint", "True", *common, "-old_exp_name", "ToyA2_tiny_lora_concatenated",
           "-exp_name", out)
    state = read_checkpoint(str(in_tmp_repo / "exp_out" / out / "best.pt"))
    assert [k for k in state if K.is_router_key(k)] == [K.router_key("encoder", i) for i in range(3)]
    reverse = np.load(library / "D_TOYREVERSE_TRAIN_K40_embeddings.npy")
    assert torch.equal(state[K.router_key("encoder", 1)], torch.from_numpy(reverse).flatten())

    small = " ".join(f"{scope}/ToyDataset.num_examples=16" for scope in TOY3_EVAL)
    launch(in_tmp_repo, *common, "-exp_name", out, "-extra_bindings",
           f"main.logging_backend=None {small} P/EVALUATE/Evaluator.analysis_processors=[@RoutingDistribution()]")
    results = read_results(str(in_tmp_repo / "exp_out" / out / "results.txt"))[-1][1]
    assert set(results) >= set(TOY3_EVAL) | {"average_score"}
    for expert, scope in enumerate(TOY3_EVAL):
        path = in_tmp_repo / "exp_out" / out / "routing_distribution" / f"{scope.replace('/', '_')}.safetensors"
        routing = load_routing_distribution(str(path))["modules"]["encoder"]["mean_probs"]
        assert routing.argmax() == expert and routing[expert] > 0.9, (scope, routing)
