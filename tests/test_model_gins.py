"""Model gins own their build lists, -arch maps to one file in one place, and architecture facts live in
colm/models/ (architecture.py, interfaces.py)."""

import glob
import os
import re
import subprocess

import gin
import pytest
from conftest import REPO_ROOT, TINY_T5, subprocess_env, write_random_moe_checkpoint

import colm.main  # noqa: F401  (registers main, which eval.gin binds)
from colm.ginparse import parse_gin
from colm.models import architecture as A
from colm.models import interfaces, model_gins, module_names

MOE_BUILD = ["M/MODEL/ENCODER/watch_hiddens", "M/MODEL/DECODER/watch_hiddens", "M/MODEL/ENCODER/make_moe",
             "M/MODEL/DECODER/make_moe"]
SENTENCE = ['M/MODEL/ENCODER/ExposeHidden.reduction_method="masked_mean"',
            'M/MODEL/DECODER/ExposeHidden.reduction_method="mean"', "M/MODEL/FFNExperts.topk_value=None"]


def init_calls(files, bindings=()):
    """The scoped names of the moma calls Model.init_moma_calls runs under these gin files, in order."""
    gin.clear_config()
    parse_gin(files, list(bindings))
    value = gin.query_parameter("M/MODEL/Model.init_moma_calls")
    if isinstance(value, gin.config.ConfigurableReference):  # @M/MODEL/moma_calls(): build, then experts
        assert value.scoped_selector == "M/MODEL/moma_calls" and value.evaluate
        value = list(gin.query_parameter("M/MODEL/moma_calls.build"))
        try:
            value += list(gin.query_parameter("M/MODEL/moma_calls.experts"))
        except ValueError:  # not bound: nothing added
            pass
    return [call.scoped_selector for call in value]


@pytest.mark.parametrize("model_type", ["t5xl", "tiny"])
def test_each_model_gin_owns_its_build_list_and_experiments_add_the_experts(model_type, monkeypatch):
    monkeypatch.setenv("EXP_NAME", "x")
    d = f"colm/models/{model_type}"
    for arch in ("moe_lora_rank16", "moe_lora_rank16_a1", "moe_lora_rank16_a2", "moe_lora_rank16_single"):
        assert init_calls([f"{d}/t5.gin", f"{d}/{arch}.gin"]) == MOE_BUILD
        assert init_calls([f"{d}/t5.gin", f"{d}/{arch}.gin", "colm/experiments/eval.gin"]) == (
            MOE_BUILD + ["M/MODEL/load_weights"])
    assert init_calls([f"{d}/t5.gin", f"{d}/moe_lora_rank16.gin", "colm/experiments/train_single_task.gin"]) == (
        MOE_BUILD + ["M/MODEL/extend_moe"])
    lora = [f"{d}/t5.gin", "colm/models/moe_lora_rank16.gin"]
    assert init_calls(lora + ["colm/experiments/train_single_task_loralinear.gin"]) == ["M/MODEL/modify_with_lora"]
    assert init_calls(lora + ["colm/experiments/train_multitask.gin"]) == ["M/MODEL/modify_with_lora"]
    assert init_calls(lora + ["colm/experiments/eval.gin"]) == ["M/MODEL/modify_with_lora", "M/MODEL/load_weights"]
    # The retrieval model's build list, whichever of it and eval.gin comes first.
    retriever = ["M/MODEL/insert_feature_extractor", "M/MODEL/make_moe", "M/MODEL/load_weights"]
    assert init_calls([f"{d}/t5.gin", f"{d}/moe_lora_retriever.gin", "colm/experiments/eval.gin"]) == retriever
    assert init_calls([f"{d}/t5.gin", "colm/experiments/eval.gin", f"{d}/moe_lora_retriever.gin"]) == retriever


def test_a_bound_init_moma_calls_list_still_replaces_everything(monkeypatch):
    """The README's base model (`Model.init_moma_calls=[]`) and full lists written out by hand keep working."""
    monkeypatch.setenv("EXP_NAME", "x")
    files = ["colm/models/tiny/t5.gin", "colm/models/tiny/moe_lora_rank16_a2.gin", "colm/experiments/eval.gin"]
    assert init_calls(files, ["M/MODEL/Model.init_moma_calls=[]"]) == []
    full = "M/MODEL/Model.init_moma_calls=[" + ", ".join(f"@{c}" for c in MOE_BUILD + ["M/MODEL/load_weights"]) + "]"
    assert init_calls(files, [full]) == MOE_BUILD + ["M/MODEL/load_weights"]


def test_no_launcher_or_experiment_gin_repeats_a_build_list_or_the_single_expert_recipe():
    files = glob.glob(os.path.join(REPO_ROOT, "colm/experiments/**/*.gin"), recursive=True) + glob.glob(
        os.path.join(REPO_ROOT, "colm/experiments/bash_scripts/*.sh")) + [os.path.join(REPO_ROOT, "colm/quickstart.py")]
    for path in files:
        text = open(path).read()
        for name in ("watch_hiddens", "make_moe", "modify_with_lora", "insert_feature_extractor",
                     "init_moma_calls=[@", "masked_mean", "moe_lora_rank16_a1.gin", "moe_lora_rank16_a2.gin"):
            assert name not in text, (os.path.relpath(path, REPO_ROOT), name)


def test_single_is_the_sentence_level_recipe(monkeypatch):
    """-arch single builds what A2 plus the README's three bindings built (after the launcher's top-2 defaults)."""
    from colm import registry

    def addon_settings(files, bindings):
        gin.clear_config()
        registry.reset()
        parse_gin(files, bindings + ["M/MODEL/Model.device='cpu'"])
        model = registry.get_object("M/MODEL")
        hiddens = {n: a.reduction_method for n, a in model.addons["pre_expose_hiddens"].items()}
        experts = {n: (a.topk_value, a.normalize_topk) for n, a in model.addons["expert_lora"].items()}
        return hiddens, experts

    d = "colm/models/tiny"
    single = addon_settings([f"{d}/t5.gin", f"{d}/moe_lora_rank16_single.gin"], [])
    long_form = addon_settings([f"{d}/t5.gin", f"{d}/moe_lora_rank16_a2.gin"],
                               ["M/MODEL/FFNExperts.topk_value=2", "M/MODEL/FFNExperts.normalize_topk=True"] + SENTENCE)
    assert set(single[0].values()) == {"masked_mean", "mean"}
    assert {v[0] for v in single[1].values()} == {None}
    assert single[0] == long_form[0]
    assert {n: v[0] for n, v in single[1].items()} == {n: v[0] for n, v in long_form[1].items()}


def bash(script):
    return subprocess.run(["bash", "-c", f"source colm/experiments/bash_scripts/_common.sh; {script}"], cwd=REPO_ROOT,
                          env=subprocess_env(REPO_ROOT), capture_output=True, text=True)


def test_arch_gin_is_one_table_for_bash_and_python():
    for arch, file in model_gins.ARCH_FILES.items():
        done = bash(f"model_type=tiny; arch_gin {arch}")
        assert done.returncode == 0 and done.stdout.strip() == f"colm/models/tiny/{file}", done.stderr
        assert os.path.isfile(os.path.join(REPO_ROOT, done.stdout.strip()))
        assert os.path.isfile(os.path.join(REPO_ROOT, "colm/models/t5xl", file))
    assert bash("model_type=t5xl; model_gin_dir").stdout.strip() == "colm/models/t5xl"
    done = bash("model_type=tiny; arch_gin A3")
    assert done.returncode == 2 and "-arch must be A2, A1 or single, got 'A3'" in done.stderr
    done = bash("model_type=tiny; arch_gin single A2 A1")
    assert done.returncode == 2 and "-arch must be A2 or A1, got 'single'" in done.stderr
    done = bash("model_type=nope; model_gin_dir")
    assert done.returncode == 2 and "no model type 'nope'" in done.stderr
    with pytest.raises(ValueError, match="-arch must be A2 or A1"):
        model_gins.arch_gin("single", "tiny", allowed=("A2", "A1"))


@pytest.mark.slow
def test_eval_launcher_single_equals_the_readme_bindings(in_tmp_repo):
    """eval_multitask.sh -arch single and the README's long form generate the same text (two random experts, so that
    the sentence-level weights matter; the launcher's top-2 default must not override the single gin's topk_value)."""
    write_random_moe_checkpoint(in_tmp_repo / "exp_out/one/best.pt", n_experts=2)
    common = ("main.logging_backend=None P/EVALUATE/Evaluator.datasets=[\"D/TOYREVERSE/EVAL\"] "
              "D/TOYREVERSE/EVAL/ToyDataset.num_examples=4 P/EVALUATE/Evaluator.analysis_processors=[@WriteOutputText()]")
    texts, logs = [], []
    for flags in (["-arch", "single", "-extra_bindings", common], ["-extra_bindings", " ".join([common] + SENTENCE)]):
        done = subprocess.run(["bash", "colm/experiments/bash_scripts/eval_multitask.sh", "-exp_name", "one", *flags],
                              cwd=in_tmp_repo, env=subprocess_env(in_tmp_repo), capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        texts.append((in_tmp_repo / "exp_out/one/output_text/D_TOYREVERSE_EVAL.json").read_text())
        logs.append(next(line for line in done.stderr.splitlines() if line.startswith("[launcher]")))
    assert "moe_lora_rank16_single.gin" in logs[0] and "topk_value=2" not in logs[0]
    assert "moe_lora_rank16_a2.gin" in logs[1] and "topk_value=2" in logs[1]
    assert texts[0] == texts[1]


# ----- architecture facts ---------------------------------------------------------------------------------------


def tiny_module_names():
    import transformers

    return [n for n, _ in transformers.T5ForConditionalGeneration.from_pretrained(TINY_T5).named_modules()]


def test_token_side_and_stacks_agree_with_the_rules_they_replace():
    names = tiny_module_names()
    cross_kv = ("EncDecAttention.k", "EncDecAttention.v")
    for name in names:
        old_encoder_side = name.startswith("encoder") or name.endswith(cross_kv)
        assert A.token_side(name) == ("encoder" if old_encoder_side else "decoder"), name
        if A.stack_of(name) is not None:  # moe.py's Router: decoder routers keep every generation step
            old_concatenate = "decoder" in name and not re.search(r"EncDecAttention\.[kv]$", name)
            assert (A.token_side(name) == "decoder") == old_concatenate, name
    assert A.stack_of("decoder") == "decoder" and A.stack_of("decoder.block.0") == "decoder"
    assert A.stack_of("lm_head") is None and A.stack_of("decoderx") is None
    assert A.token_side("decoder") == "decoder"  # A1's whole-decoder router routes decoder tokens
    assert A.block_of("decoder.block.2.layer.1.EncDecAttention.k._addons.router.expert_embeddings__0") == "decoder.block.2"
    assert A.block_number("encoder.block.11.layer.0.SelfAttention.q") == 11 and A.block_of("decoder") is None
    assert A.is_ffn("encoder.block.0.layer.1.DenseReluDense.wo._addons.expert_lora.layer1__0")
    assert not A.is_ffn("encoder.block.0.layer.0.SelfAttention.o.expert_lora_a")
    assert A.reads_model_width("decoder.block.1.layer.0.SelfAttention.q")
    assert not A.reads_model_width("decoder.block.1.layer.1.EncDecAttention.q")


def test_a1_facts_match_the_a1_gin():
    names = tiny_module_names()
    assert A.a1_router_input() in names and A.a1_router() in names
    # moe_lora_rank16_a1.gin wires the decoder router's input and host by shortcut; the facts name the same modules
    assert re.fullmatch(module_names.to_regex("encoder_final_ln"), A.a1_router_input())
    text = open(os.path.join(REPO_ROOT, "colm/models/t5xl/moe_lora_rank16_a1.gin")).read()
    assert f'M/MODEL/DECODER/make_moe.router_modules = "{A.a1_router()}"' in text
    sources = [n for n in names if n.startswith("decoder.") and any(s in n for s in A.a1_router_sources())]
    assert sources and all(A.token_side(n) == "encoder" for n in sources)


def test_module_groups_special_ids_and_interfaces():
    assert A.module_groups()[0] == "encoder self-attn" and len(A.module_groups()) == 6
    assert A.module_group("decoder.block.0.layer.2.DenseReluDense.wi_1") == "decoder FFN"
    from colm.datasets.dataset import special_ids
    from colm.models.hf_loading import hf_tokenizer

    tokenizer = hf_tokenizer(TINY_T5)
    assert special_ids(tokenizer) == (None, tokenizer.eos_token_id)
    assert interfaces.for_architecture("t5") is interfaces.ENCODER_DECODER
    with pytest.raises(NotImplementedError, match="interfaces.py"):
        interfaces.for_architecture("mamba")
    with pytest.raises(NotImplementedError, match="architecture.py"):
        A.token_side("backbone.layers.0.mixer.in_proj", "mamba")
