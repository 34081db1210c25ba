"""HF PEFT LoRA adapters in and out (colm/formats/peft_adapters.py): the same logits as PEFT's own model, PEFT's
`cat` merge equal to colm's Merged Experts, lossless round trips, refusals.

The base is a small random T5 saved by the test (the embedded tokenizer's vocabulary, tied embeddings so that the
logits are O(1)). The conversion is exact (in float64 the two models agree to 1e-14 where PEFT's scale times
d_bottleneck is a power of two); in float32 colm's routed LoRA (one fused addmm into the linear's output) and
PEFT's (a separate add) round differently, and the embedded pre-trained toy T5 amplifies those 1e-7 relative
differences to about 1e-5 in its logits (magnitude 10), too close to the 1e-5 tolerance.
"""

import atexit
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch

peft = pytest.importorskip("peft", reason="peft is not installed (pip install peft==0.21.2 --no-deps, see "
                                          "requirements.txt); it is only needed for the PEFT import/export path")

from conftest import REPO_ROOT, subprocess_env  # noqa: E402

import colm.main  # noqa: E402,F401  registers main, which eval.gin binds
from colm import registry  # noqa: E402
from colm.checkpoints.merging import average_outer_product_lora_weights_state  # noqa: E402
from colm.formats import keys as K  # noqa: E402
from colm.formats import peft_adapters as P  # noqa: E402
from colm.formats.checkpoint_io import read_checkpoint, write_checkpoint  # noqa: E402
from colm.ginparse import parse_gin  # noqa: E402
from colm.models import module_names  # noqa: E402
from colm.models.model_gins import arch_gin  # noqa: E402

LINEARS = ["q", "k", "v", "o", "wi_0", "wi_1", "wo"]
D_BOTTLENECK = 16  # FFNExperts.d_bottleneck of the shipped gins
TOL = 1e-5


@functools.cache
def base_dir():
    """The base model's directory, saved once per session."""
    from transformers import T5Config, T5ForConditionalGeneration

    directory = tempfile.mkdtemp(prefix="colm-peft-t5-")
    atexit.register(shutil.rmtree, directory, True)
    torch.manual_seed(0)
    config = T5Config(vocab_size=1329, d_model=64, d_ff=128, d_kv=16, num_layers=2, num_decoder_layers=2,
                      num_heads=4, feed_forward_proj="gated-gelu", dropout_rate=0.0, decoder_start_token_id=0,
                      pad_token_id=0, eos_token_id=1, tie_word_embeddings=True)
    T5ForConditionalGeneration(config).save_pretrained(directory)
    return directory


def base_model():
    from transformers import AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM.from_pretrained(base_dir()).eval()


def base_linears():
    found = module_names.match_modules(base_model(), ["encoder_linear", "decoder_linear"])
    return {name: (m.in_features, m.out_features) for name, m in found.items()}


def inputs():
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 1000, (2, 9), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # one padded example
    return dict(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :5])


def logits(model):
    with torch.no_grad():
        return model(**inputs()).logits


def colm_logits(checkpoint):
    """Logits of colm's model as `eval_multitask.sh -model_type tiny -arch single` builds it (gin, load_weights),
    with the test's base model."""
    parse_gin(["colm/models/tiny/t5.gin", arch_gin("single", "tiny"), "colm/experiments/eval.gin"],
              [f"M/MODEL/load_weights.weight_path='{checkpoint}'", "M/MODEL/Model.device='cpu'",
               f"M/MODEL/hf_torch_model.model_name_or_path='{base_dir()}'"])
    model = registry.get_object("M/MODEL")
    model.eval()
    return logits(model.torch_model)


def save_peft_adapter(directory, seed=0, **config):
    """A PEFT LoRA with random non-zero factors, saved by PEFT itself."""
    model = peft.get_peft_model(base_model(), peft.LoraConfig(**config))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    model.save_pretrained(str(directory))
    return model.eval()


def random_experts(n, rank, seed=0):
    """A colm checkpoint of n experts on every linear, with random router vectors."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for module, (d_in, d_out) in base_linears().items():
        for i in range(n):
            state[K.layer1_key(module, i)] = torch.randn(d_in, rank, generator=generator) * 0.5
            state[K.layer2_key(module, i)] = torch.randn(rank, d_out, generator=generator) * 0.5
            state[K.router_key(module, i)] = torch.randn(d_in, generator=generator)
    return state


def check_close(a, b, reference, what):
    diff = (a - b).abs().max().item()
    print(f"[peft] {what}: max |difference| {diff:.2e}")
    assert (a - reference).abs().max() > 1e-2, "the adapter must change the logits for the test to mean anything"
    assert diff < TOL, f"{what}: max difference {diff}"


# ------------------------------------------------------------------------------------------------ import
IMPORT_CASES = {
    "all linears": dict(r=2, lora_alpha=8, target_modules=LINEARS),
    "some linears, rank and alpha patterns": dict(r=4, lora_alpha=3, target_modules=["q", "v", "wo"],
                                                  rank_pattern={"wo": 2}, alpha_pattern={"q": 6}),
    "regex targets, rslora": dict(r=3, lora_alpha=5, use_rslora=True, target_modules=r".*\.(q|k|v|o|wi_0|wi_1|wo)"),
}


@pytest.mark.parametrize("case", IMPORT_CASES)
def test_imported_adapter_gives_peft_logits(tmp_path, case):
    peft_model = save_peft_adapter(tmp_path / "adapter", **IMPORT_CASES[case])
    state = P.import_adapter(str(tmp_path / "adapter"), D_BOTTLENECK, base_linears())
    assert K.expert_count(state) == 1 and len(K.expert_modules(state)) == len(base_linears())
    write_checkpoint(state, str(tmp_path / "best.pt"))
    check_close(colm_logits(tmp_path / "best.pt"), logits(peft_model), logits(base_model()), f"import ({case})")


class Payload:
    """An object a crafted pickle would carry instead of tensors."""


def test_pickled_adapter_is_read_with_weights_only(tmp_path):
    save_peft_adapter(tmp_path, r=2, lora_alpha=4, target_modules=["q", "v"])
    from_safetensors = P.import_adapter(str(tmp_path))
    from safetensors.torch import load_file

    torch.save(load_file(str(tmp_path / P.WEIGHTS_FILE)), tmp_path / P.PICKLED_WEIGHTS_FILE)
    os.remove(tmp_path / P.WEIGHTS_FILE)
    from_pickle = P.import_adapter(str(tmp_path))
    assert from_pickle.keys() == from_safetensors.keys()
    assert all(torch.equal(from_pickle[k], from_safetensors[k]) for k in from_pickle)

    torch.save({"x": Payload()}, tmp_path / P.PICKLED_WEIGHTS_FILE)
    with pytest.raises(ValueError, match="never unpickles code"):
        P.import_adapter(str(tmp_path))


# ------------------------------------------------------------------------------------------------ export
def test_exported_expert_gives_colm_logits_in_peft(tmp_path):
    state = random_experts(1, rank=4)
    state.update({k: torch.zeros_like(v) for k, v in state.items() if K.is_router_key(k)})
    for module in [m for m in K.expert_modules(state) if m.endswith(".wo")]:  # another rank: PEFT's rank_pattern
        state[K.layer1_key(module, 0)] = state[K.layer1_key(module, 0)][:, :2].contiguous()
        state[K.layer2_key(module, 0)] = state[K.layer2_key(module, 0)][:2].contiguous()
    write_checkpoint(state, str(tmp_path / "best.pt"))
    P.export_expert(state, str(tmp_path / "adapter"))
    assert json.loads((tmp_path / "adapter" / P.CONFIG_FILE).read_text())["rank_pattern"]
    peft_model = peft.PeftModel.from_pretrained(base_model(), str(tmp_path / "adapter")).eval()
    check_close(logits(peft_model), colm_logits(tmp_path / "best.pt"), logits(base_model()), "export")


def test_peft_cat_merge_equals_merged_experts(tmp_path):
    n = 3
    state = random_experts(n, rank=2)
    write_checkpoint(average_outer_product_lora_weights_state(state), str(tmp_path / "merged.pt"))
    directories = P.export_routed_set(state, str(tmp_path / "set"))
    model = peft.PeftModel.from_pretrained(base_model(), directories[0], adapter_name="e0")
    for i in range(1, n):
        model.load_adapter(directories[i], adapter_name=f"e{i}")
    model.add_weighted_adapter([f"e{i}" for i in range(n)], [1 / n] * n, "merged", combination_type="cat")
    model.set_adapter("merged")
    check_close(logits(model.eval()), colm_logits(tmp_path / "merged.pt"), logits(base_model()),
                "PEFT cat merge vs Merged Experts")


# ------------------------------------------------------------------------------------------------ round trips
def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def test_import_export_import_is_identity(tmp_path):
    save_peft_adapter(tmp_path / "a", r=2, lora_alpha=8, target_modules=["q", "wo"], rank_pattern={"wo": 3})
    first = P.import_adapter(str(tmp_path / "a"), D_BOTTLENECK, base_linears())
    P.export_expert(first, str(tmp_path / "b"))  # wo's rank 3 goes to rank_pattern
    assert_same(P.import_adapter(str(tmp_path / "b"), D_BOTTLENECK, base_linears()), first)

    save_peft_adapter(tmp_path / "c", r=4, lora_alpha=3, target_modules=["q", "v"])
    first = P.import_adapter(str(tmp_path / "c"), D_BOTTLENECK, base_linears())
    P.export_expert(first, str(tmp_path / "d"), base_model=base_dir())
    assert_same(P.import_adapter(str(tmp_path / "d"), D_BOTTLENECK, base_linears()), first)


def test_routed_set_round_trip_and_files(tmp_path):
    state = random_experts(3, rank=2, seed=1)
    names = ["alpha", "beta", "gamma"]
    directories = P.export_routed_set(state, str(tmp_path), names)
    assert directories == [str(tmp_path / n) for n in names]
    routing = json.loads((tmp_path / P.ROUTING_FILE).read_text())
    assert [e["name"] for e in routing["experts"]] == names and routing["rule"]["top_k"] == 2
    from safetensors.torch import load_file

    assert_same(load_file(str(tmp_path / P.ROUTER_FILE)), {k: v for k, v in state.items() if K.is_router_key(k)})
    for i, directory in enumerate(directories):
        imported = P.import_adapter(directory, D_BOTTLENECK, base_linears())
        expected = {K.IndexedKey(p.module, p.param, 0).key: v for p, v in K.indexed_entries(state).items()
                    if p.index == i and not p.is_router}
        assert_same({k: v for k, v in imported.items() if not K.is_router_key(k)}, expected)
    with pytest.raises(FileExistsError, match="overwrite"):
        P.export_routed_set(state, str(tmp_path), names)
    P.export_routed_set(state, str(tmp_path), names, overwrite=True)


# ------------------------------------------------------------------------------------------------ refusals
def edit_config(directory, **changes):
    path = directory / P.CONFIG_FILE
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


CONFIG_REFUSALS = [
    (dict(bias="all"), 'bias="none"'),
    (dict(use_dora=True), "DoRA"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(fan_in_fan_out=True), '"fan_in_fan_out": false'),
    (dict(peft_type="IA3"), "LoRA adapters only"),
    (dict(r=3), "rank 2 but adapter_config.json gives r=3"),
    (dict(target_modules=["k"]), "does not name"),
]


@pytest.fixture
def small_adapter(tmp_path):
    save_peft_adapter(tmp_path, r=2, lora_alpha=4, target_modules=["q", "v"])
    return tmp_path


@pytest.mark.parametrize("changes, message", CONFIG_REFUSALS)
def test_import_refuses_settings_colm_cannot_represent(small_adapter, changes, message):
    edit_config(small_adapter, **changes)
    with pytest.raises(ValueError, match=message) as error:
        P.import_adapter(str(small_adapter))
    assert "adapter_config.json" in str(error.value)


def test_import_refuses_a_real_dora_adapter_and_foreign_keys(tmp_path):
    save_peft_adapter(tmp_path / "dora", r=2, lora_alpha=4, target_modules=["q"], use_dora=True)
    with pytest.raises(ValueError, match="use_dora"):
        P.import_adapter(str(tmp_path / "dora"))
    edit_config(tmp_path / "dora", use_dora=False)  # a config that hides it: the weights still betray DoRA
    with pytest.raises(ValueError, match=r"lora_magnitude_vector.*DoRA"):
        P.import_adapter(str(tmp_path / "dora"))


def test_import_refuses_a_base_model_whose_linears_do_not_match(small_adapter):
    linears = base_linears()
    with pytest.raises(ValueError, match="not one of the base model's"):
        P.import_adapter(str(small_adapter), base_linears={k: v for k, v in linears.items() if not k.endswith(".q")})
    other_size = {k: (v[0] * 2, v[1]) for k, v in linears.items()}
    with pytest.raises(ValueError, match="another base model size"):
        P.import_adapter(str(small_adapter), base_linears=other_size)


def test_export_refusals(tmp_path):
    state = random_experts(2, rank=2)
    with pytest.raises(ValueError, match="holds 2 experts; give the index"):
        P.export_expert(state, str(tmp_path / "a"))
    with pytest.raises(ValueError, match="no expert with index 2"):
        P.export_expert(state, str(tmp_path / "a"), index=2)
    with pytest.raises(ValueError, match="put_index_to_lora"):
        P.export_expert({K.lora_key("encoder.block.0.layer.0.SelfAttention.q", "a"): torch.zeros(2, 64),
                         K.lora_key("encoder.block.0.layer.0.SelfAttention.q", "b"): torch.zeros(64, 2)},
                        str(tmp_path / "a"))
    with pytest.raises(ValueError, match="use_input_gate_as_router"):
        P.export_routed_set({k: v for k, v in state.items() if not K.is_router_key(k)}, str(tmp_path / "s"))
    P.export_expert(state, str(tmp_path / "a"), index=1)
    with pytest.raises(FileExistsError, match="overwrite"):
        P.export_expert(state, str(tmp_path / "a"), index=0)


# ------------------------------------------------------------------------------------------------ command lines
@pytest.mark.slow
def test_command_lines(in_tmp_repo):
    save_peft_adapter(in_tmp_repo / "adapter", r=2, lora_alpha=8, target_modules=["q", "v"])
    env = subprocess_env(in_tmp_repo)

    def run(script, *args):
        done = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "scripts", script), *args], cwd=in_tmp_repo,
                              env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]

    run("import_peft_adapter.py", "--adapter", "adapter", "--out_path", "datasets_concatenated/Mine_lora",
        "--base_model", base_dir())
    imported = read_checkpoint("exp_out/datasets_concatenated/Mine_lora/best.pt")
    assert_same(imported, P.import_adapter(str(in_tmp_repo / "adapter"), D_BOTTLENECK, base_linears()))
    run("export_peft_adapter.py", "--path", "datasets_concatenated/Mine_lora", "--out_dir", "exported")
    assert_same(P.import_adapter(str(in_tmp_repo / "exported"), D_BOTTLENECK, base_linears()), imported)
