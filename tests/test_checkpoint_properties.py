"""Property tests of the checkpoint surgery (colm/checkpoints): on random small checkpoints in the key format,
well-formed or damaged, every function either returns a checkpoint that keeps every key it does not touch,
bit for bit, or refuses with a ValueError / KeyError / NotImplementedError whose message names the function
(never an IndexError, a torch RuntimeError or a message that leaves the user guessing)."""

import re

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from colm.checkpoints import (  # noqa: E402
    blocks,
    decoder_router,
    experts,
    gates,
    merging,
    router_from_weights,
    router_vectors,
)
from colm.checkpoints.concatenate import concatenate_states  # noqa: E402
from colm.formats import keys as K  # noqa: E402

D_MODEL, D_FF, VOCAB = 4, 6, 5
# (module, d_in, d_out): a few linears of a two-block T5 encoder and decoder.
MODULES = [
    ("encoder.block.0.layer.0.SelfAttention.q", D_MODEL, D_MODEL),
    ("encoder.block.0.layer.1.DenseReluDense.wo", D_FF, D_MODEL),
    ("encoder.block.1.layer.0.SelfAttention.v", D_MODEL, D_MODEL),
    ("encoder.block.1.layer.1.DenseReluDense.wi_0", D_MODEL, D_FF),
    ("decoder.block.0.layer.0.SelfAttention.q", D_MODEL, D_MODEL),
    ("decoder.block.0.layer.1.EncDecAttention.k", D_MODEL, D_MODEL),
    ("decoder.block.1.layer.1.EncDecAttention.v", D_MODEL, D_MODEL),
    ("decoder.block.1.layer.2.DenseReluDense.wo", D_FF, D_MODEL),
]
EXPECTED = (ValueError, KeyError, NotImplementedError)
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _tensor(shape, seed, dtype):
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.5).to(dtype)


@st.composite
def moe_checkpoints(draw, damaged=True):
    """A MoE-format checkpoint: experts (layer1 d_in x r, layer2 r x d_out) on a subset of MODULES, router vectors,
    maybe gates (one expert) and embed_tokens; when `damaged`, maybe one fault (a key dropped, a shape changed, an
    index gap, an unknown key)."""
    seed = draw(st.integers(0, 2**16))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    n = draw(st.integers(1, 3))
    rank = draw(st.integers(1, 3))
    chosen = draw(st.lists(st.sampled_from(MODULES), min_size=1, max_size=len(MODULES), unique=True))
    with_routers = draw(st.booleans())
    state, counter = {}, iter(range(seed, seed + 10_000))
    for module, d_in, d_out in chosen:
        for i in range(n):
            state[K.layer1_key(module, i)] = _tensor((d_in, rank), next(counter), dtype)
            state[K.layer2_key(module, i)] = _tensor((rank, d_out), next(counter), dtype)
            if with_routers:
                state[K.router_key(module, i)] = _tensor((d_in,), next(counter), dtype)
        if n == 1 and draw(st.booleans()):
            state[K.gate_key(module)] = _tensor((d_in,), next(counter), dtype)
    if draw(st.booleans()):
        for key in K.EMBEDDING_KEYS:
            state[key] = _tensor((VOCAB, D_MODEL), next(counter), dtype)
    if damaged:
        fault = draw(st.sampled_from(["none", "drop", "shape", "gap", "unknown", "nan"]))
        keys = sorted(state)
        if fault == "drop" and len(keys) > 1:
            del state[draw(st.sampled_from(keys))]
        elif fault == "shape":
            key = draw(st.sampled_from(keys))
            state[key] = _tensor(tuple(s + 1 for s in state[key].shape), next(counter), dtype)
        elif fault == "gap":
            indexed = [k for k in keys if K.parse_indexed(k)]
            key = draw(st.sampled_from(indexed))
            parsed = K.parse_indexed(key)
            state[parsed.with_index(parsed.index + 5).key] = state.pop(key)
        elif fault == "unknown":
            state["encoder.block.0.layer.0.SelfAttention.q.something_else"] = torch.zeros(2)
        elif fault == "nan":
            key = draw(st.sampled_from(keys))
            state[key] = state[key].clone()
            state[key].view(-1)[0] = float("nan")
    return state


@st.composite
def lora_checkpoints(draw):
    seed = draw(st.integers(0, 2**16))
    rank = draw(st.integers(1, 3))
    chosen = draw(st.lists(st.sampled_from(MODULES), min_size=1, max_size=4, unique=True))
    state = {}
    for j, (module, d_in, d_out) in enumerate(chosen):
        state[K.lora_key(module, "a")] = _tensor((rank, d_in), seed + 2 * j, torch.float32)
        state[K.lora_key(module, "b")] = _tensor((d_out, rank), seed + 2 * j + 1, torch.float32)
    if draw(st.booleans()):
        state[K.EMBEDDING_KEYS[0]] = _tensor((VOCAB, D_MODEL), seed + 999, torch.float32)
    if draw(st.booleans()) and len(state) > 1:
        del state[draw(st.sampled_from(sorted(state)))]
    return state


def _is_decoder_router(key):
    parsed = K.parse_indexed(key)
    return parsed is not None and parsed.is_router and parsed.module.split(".")[0] == "decoder"


def _in_encoder_block_0(key):
    return key.startswith("encoder.block.0.")


# name -> (call on a state, predicate of the keys the function may change or drop)
OPERATIONS = {
    "use_input_gate_as_router": (gates.use_input_gate_as_router_state, K.is_router_key),
    "use_input_gate_in_router_and_expert": (gates.use_input_gate_in_router_and_expert_state,
                                            lambda k: K.parse_indexed(k) is not None),
    "delete_expert_input_gate": (gates.delete_expert_input_gate_state, K.is_gate_key),
    "concatenate_two_checkpoints": (lambda s: experts.concatenate_two_checkpoints_state(s, s, K.expert_count(s)),
                                    lambda k: False),
    "create_router_embeddings": (lambda s: router_vectors.create_router_embeddings_state(s, [".*"]), K.is_router_key),
    "delete_router_embeddings": (router_vectors.delete_router_embeddings_state, K.is_router_key),
    "add_router_embeddings": (lambda s: router_vectors.add_router_embeddings_state([s, s]), K.is_router_key),
    "create_router_embeddings_from_weights": (
        lambda s: router_from_weights.create_router_embeddings_from_weights_state(s, "top1_eigen_weighted_vector"),
        K.is_router_key),
    "make_one_router_decoder": (decoder_router.make_one_router_decoder_state, _is_decoder_router),
    "make_a_specific_checkpoint": (lambda s: decoder_router.make_a_specific_checkpoint_state(s, s), _is_decoder_router),
    "normalize_expert_weights": (lambda s: experts.normalize_expert_weights_state(s, norm_value=0.5), K.is_expert_key),
    "merge_into_blocks": (blocks.merge_into_blocks_state, K.is_router_key),
    "make_router_blockwise": (blocks.make_router_blockwise_state, K.is_router_key),
    "skip_blocks": (lambda s: blocks.skip_blocks_state(s, 0), _in_encoder_block_0),
    "skip_alternate": (lambda s: blocks.skip_alternate_state(s, True),
                       lambda k: not K.is_embedding_key(k) and ".DenseReluDense." not in k),
    "svd_orthogonalize_router": (router_vectors.svd_orthogonalize_router_state, K.is_router_key),
    "average_lora_weights": (merging.average_lora_weights_state, lambda k: not K.is_embedding_key(k)),
    "average_outer_product_lora_weights": (merging.average_outer_product_lora_weights_state,
                                           lambda k: not K.is_embedding_key(k)),
    "concatenate": (lambda s: concatenate_states([("expert.pt", s), ("expert.pt", s)]), lambda k: True),
}


def identical(a, b):
    """Bit for bit (NaN included)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8),
                                                                     b.contiguous().view(torch.uint8))


def check_operation(name, state):
    function, touched = OPERATIONS[name]
    snapshot = {k: v.clone() for k, v in state.items()}
    try:
        out = function(state)
    except EXPECTED as error:
        message = str(error)
        named = name in message or "expert.pt" in message or any(k in message for k in state)
        assert named and len(message) > 30, f"{name}: unclear error {type(error).__name__}: {message!r}"
        return
    assert isinstance(out, dict) and all(isinstance(v, torch.Tensor) for v in out.values())
    for key, value in snapshot.items():
        if touched(key):
            continue
        assert key in out, f"{name} dropped {key}, which it does not touch"
        assert identical(out[key], value), f"{name} changed {key}"
    for key, value in snapshot.items():  # the input itself is never modified
        assert identical(state[key], value), f"{name} modified its input at {key}"


@pytest.mark.parametrize("name", sorted(OPERATIONS))
@SETTINGS
@given(state=moe_checkpoints())
def test_surgery_keeps_untouched_keys_or_refuses_clearly(name, state):
    check_operation(name, state)


@SETTINGS
@given(state=lora_checkpoints())
def test_put_index_to_lora_keeps_embeddings_and_computes_the_same_update(state):
    try:
        out = experts.put_index_to_lora_state(state)
    except EXPECTED as error:
        assert "put_index_to_lora" in str(error)
        return
    for key in K.EMBEDDING_KEYS:
        if key in state:
            assert torch.equal(out[key], state[key])
    for key, a in state.items():
        parsed = K.parse_lora(key)
        if parsed and parsed[1] == "a":
            b = state[K.lora_key(parsed[0], "b")]
            x = torch.ones(1, a.shape[1])
            update = x @ out[K.layer1_key(parsed[0], 0)] @ out[K.layer2_key(parsed[0], 0)]
            torch.testing.assert_close(update, x @ a.t() @ b.t())


def test_the_generator_makes_checkpoints_the_validator_accepts():
    """The undamaged checkpoints are valid, so the properties above are not all about refusals."""
    @settings(max_examples=20, deadline=None)
    @given(state=moe_checkpoints(damaged=False))
    def valid(state):
        K.validate_experts(state, "generated")
        assert all(re.fullmatch(r"[A-Za-z_0-9.]+", k) for k in state)

    valid()
