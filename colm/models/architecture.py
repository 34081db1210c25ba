"""Architecture facts, asked by module name: the one place outside the gin files that knows how a model is wired.

Code outside colm/models/ (routers, analysis of saved routing files, checkpoint surgery) asks these functions
instead of spelling module names, so that it works without a model at hand and a new architecture is one more entry
in ARCHITECTURES (and in module_names.SHORTCUTS, colm/models/interfaces.py BY_ARCHITECTURE). There are three: T5
(encoder-decoder) and the decoder-only LLAMA (Llama-style names) and GPT2 (GPT-2 names, Conv1D linears):

- `stack_of` / `token_side`: the stack a module sits in, and the tokens it runs on (in T5 the cross-attention
  keys and values sit in the decoder but project the encoder's output, one row per encoder token);
- `block_of` / `block_number`: the transformer block of a module or checkpoint key;
- `is_ffn`, `reads_model_width`: the feed-forward modules; a module whose input is the model width (d_model);
- the A1 architecture: its one decoder router, the module whose pooled output that router reads, and the
  routers `make_one_router_decoder` averages into it;
- `module_groups` / `module_group`: the groups of the routing diagnosis.
(The bos / eos a tokenizer adds is a tokenizer fact: `special_ids` in colm/datasets/dataset.py.)

An architecture is named by the key `module_names.architecture_of(torch_model)` returns (Model.architecture).
"""

import re
from dataclasses import dataclass

T5 = "t5"
LLAMA = "llama"  # decoder-only, Llama-style names: model.layers.N.self_attn.q_proj ... mlp.gate_proj / up_proj / down_proj
GPT2 = "gpt2"  # decoder-only, GPT-2 names: transformer.h.N.attn.c_attn (fused q, k, v), c_proj, mlp.c_fc, c_proj
ENCODER, DECODER = "encoder", "decoder"
NOTHING = re.compile(r"(?!)")


@dataclass(frozen=True)
class Architecture:
    stacks: tuple  # the stacks' module names
    cross_stack: re.Pattern  # modules of a later stack that run on the first stack's tokens
    block: re.Pattern  # a module (or key) inside a block: groups "block" (its name) and "number"
    ffn: re.Pattern  # a module (or key) of a feed-forward sublayer
    model_width: re.Pattern  # a module whose input has the model width (d_model) in every block
    a1_router: str  # A1: the host of the one router shared by every decoder linear
    a1_router_input: str  # A1: the module whose output, pooled per example, that router reads
    a1_router_sources: tuple  # name parts of the routers make_one_router_decoder averages into it
    groups: tuple  # (label, full-match pattern) of the routing diagnosis' module groups
    # GPT-2 writes its linears as transformers' Conv1D (y = x W + b, W of shape d_in x d_out). Model turns each one
    # into an equal nn.Linear when it loads such a model (hf_loading.conv1d_as_linear), so LoRA, experts, gates
    # and sizes ("host_module.in_features") see nn.Linear everywhere; the expert keys stay `<module>._addons...`.
    conv1d_linears: bool = False


ARCHITECTURES = {
    T5: Architecture(
        stacks=(ENCODER, DECODER),
        cross_stack=re.compile(r"(?:.*\.)?EncDecAttention\.[kv]"),
        block=re.compile(r"(?P<block>(?:encoder|decoder)\.block\.(?P<number>\d+))(?:\..*)?"),
        ffn=re.compile(r".*\.DenseReluDense(?:\..*)?"),
        model_width=re.compile(r".*\.SelfAttention\.q"),
        a1_router=DECODER,
        a1_router_input="encoder.final_layer_norm",
        a1_router_sources=("EncDecAttention.k", "EncDecAttention.v"),
        groups=(
            ("encoder self-attn", re.compile(r"encoder\..*\.SelfAttention\.(q|k|v|o)")),
            ("encoder FFN", re.compile(r"encoder\..*\.DenseReluDense\.\w+")),
            ("decoder self-attn", re.compile(r"decoder\..*\.SelfAttention\.(q|k|v|o)")),
            ("cross-attn q/o", re.compile(r"decoder\..*\.EncDecAttention\.(q|o)")),
            ("cross-attn k/v", re.compile(r"decoder\..*\.EncDecAttention\.(k|v)")),
            ("decoder FFN", re.compile(r"decoder\..*\.DenseReluDense\.\w+")),
        ),
    ),
    # Decoder-only models have one stack and every token is a decoder token (token_side is "decoder" everywhere).
    # They have no A1 architecture (its decoder router reads the pooled output of an encoder): a1_* are None / ().
    LLAMA: Architecture(
        stacks=("model",),
        cross_stack=NOTHING,
        block=re.compile(r"(?P<block>model\.layers\.(?P<number>\d+))(?:\..*)?"),
        ffn=re.compile(r".*\.mlp(?:\..*)?"),
        model_width=re.compile(r".*\.self_attn\.q_proj"),
        a1_router=None,
        a1_router_input=None,
        a1_router_sources=(),
        groups=(
            ("decoder self-attn", re.compile(r"model\..*\.self_attn\.(q|k|v|o)_proj")),
            ("decoder FFN", re.compile(r"model\..*\.mlp\.(gate|up|down)_proj")),
        ),
    ),
    GPT2: Architecture(
        stacks=("transformer",),
        cross_stack=NOTHING,
        block=re.compile(r"(?P<block>transformer\.h\.(?P<number>\d+))(?:\..*)?"),
        ffn=re.compile(r".*\.mlp(?:\..*)?"),
        model_width=re.compile(r".*\.attn\.c_attn"),
        a1_router=None,
        a1_router_input=None,
        a1_router_sources=(),
        groups=(
            ("decoder self-attn", re.compile(r"transformer\..*\.attn\.(c_attn|c_proj)")),
            ("decoder FFN", re.compile(r"transformer\..*\.mlp\.(c_fc|c_proj)")),
        ),
        conv1d_linears=True,
    ),
}


def facts(architecture: str = T5) -> Architecture:
    if architecture not in ARCHITECTURES:
        raise NotImplementedError(f"No architecture facts for {architecture!r}; add them to colm/models/architecture.py.")
    return ARCHITECTURES[architecture]


# ----- stacks and token sides -----------------------------------------------------------------------------
def stack_of(name: str, architecture: str = T5):
    """The stack a module (or checkpoint key) belongs to: "encoder", "decoder" (T5), or None outside them."""
    for stack in facts(architecture).stacks:
        if name == stack or name.startswith(stack + "."):
            return stack
    return None


def token_side(module_name: str, architecture: str = T5) -> str:
    """The tokens a module runs on: "encoder" (the input's tokens: the encoder stack and, in T5, the
    cross-attention keys and values) or "decoder" (every other module, including whole-stack routers)."""
    if stack_of(module_name, architecture) == ENCODER or facts(architecture).cross_stack.fullmatch(module_name):
        return ENCODER
    return DECODER


# ----- blocks and kinds of module -------------------------------------------------------------------------
def block_of(name: str, architecture: str = T5):
    """`encoder.block.3` for `encoder.block.3.layer.0.SelfAttention.q` (or a key under it); None outside blocks."""
    match = facts(architecture).block.fullmatch(name)
    return match["block"] if match else None


def block_number(name: str, architecture: str = T5):
    match = facts(architecture).block.fullmatch(name)
    return int(match["number"]) if match else None


def is_ffn(name: str, architecture: str = T5) -> bool:
    """True for a feed-forward module (or a key under one)."""
    return facts(architecture).ffn.fullmatch(name) is not None


def reads_model_width(module_name: str, architecture: str = T5) -> bool:
    """True for a module whose input is the model width (d_model), e.g. T5's self-attention query (the FFN's
    output projection, for one, reads d_ff)."""
    return facts(architecture).model_width.fullmatch(module_name) is not None


# ----- the A1 architecture --------------------------------------------------------------------------------
def _a1(architecture, fact):
    value = getattr(facts(architecture), fact)
    if value is None:
        raise NotImplementedError(f"Architecture {architecture!r} has no A1 (its decoder router reads the pooled output "
                                  "of an encoder); use -arch A2 or single.")
    return value


def a1_router(architecture: str = T5) -> str:
    """The module that hosts A1's one decoder router (checkpoint keys `<it>._addons.router...`)."""
    return _a1(architecture, "a1_router")


def a1_router_input(architecture: str = T5) -> str:
    """The module whose output, pooled per example, the A1 decoder router reads (its gin shortcut is
    "encoder_final_ln"; moe_lora_rank16_a1.gin wires it)."""
    return _a1(architecture, "a1_router_input")


def a1_router_sources(architecture: str = T5) -> tuple:
    """Name parts of the per-linear routers whose vectors, averaged, make the A1 decoder router's vectors: the
    modules that read what it reads (the encoder's output)."""
    return facts(architecture).a1_router_sources


# ----- routing diagnosis ----------------------------------------------------------------------------------
def module_groups(architecture: str = T5) -> list:
    """The labels of the routing diagnosis' module groups, in report order ("other" not included)."""
    return [label for label, _ in facts(architecture).groups]


def module_group(module_name: str, architecture: str = T5) -> str:
    for label, pattern in facts(architecture).groups:
        if pattern.fullmatch(module_name):
            return label
    return "other"
