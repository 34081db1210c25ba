"""Module-name shortcuts: one place that knows how each architecture names its modules.

A pattern is a shortcut name, a raw regular expression, a quoted string (taken literally) or a list
(OR-joined). Patterns are full-matched against `named_modules()` names.
"""

import re

from colm.models.architecture import GPT2 as GPT2_ARCHITECTURE
from colm.models.architecture import LLAMA as LLAMA_ARCHITECTURE
from colm.models.architecture import T5 as T5_ARCHITECTURE

SHARED = {
    "all": r".*",
    "model": r"",
    "nothing": r"(?!)",
    "none": r"(?!)",
    "expert": r".*expert.*",
    # the gates of addons (expert_input_gate), not a model's own modules with "gate" in their name (Llama's gate_proj)
    "gate": r".*\._addons\..*gate.*",
}

_B = r"\d+"
T5 = {
    "encoder": r"encoder",
    "encoder_block": rf"encoder\.block\.{_B}",
    "encoder_sublayer": rf"encoder\.block\.{_B}\.layer\.{_B}\.(SelfAttention|DenseReluDense)",
    "encoder_linear": rf"encoder\.block\.{_B}\.layer\.{_B}\.(SelfAttention|DenseReluDense)\.(q|k|v|o|wi(_\d)?|wo)",
    "encoder_final_ln": r"encoder\.final_layer_norm",
    "decoder": r"decoder",
    "decoder_block": rf"decoder\.block\.{_B}",
    "decoder_sublayer": rf"decoder\.block\.{_B}\.layer\.{_B}\.(SelfAttention|EncDecAttention|DenseReluDense)",
    "decoder_linear": (
        rf"decoder\.block\.{_B}\.layer\.{_B}\.(SelfAttention|EncDecAttention|DenseReluDense)\.(q|k|v|o|wi(_\d)?|wo)"
    ),
    "decoder_final_ln": r"decoder\.final_layer_norm",
    # Plain LoRA (colm/models/moe_lora_rank16.gin): the modules whose children get a LoRALinear, and those children.
    "lora_hosts": r".*SelfAttention|.*EncDecAttention|.*DenseReluDense",
    "lora_children": r"q|k|v|o|w.*",
}

# Decoder-only: one stack, named "decoder" here (every token is a decoder token); no "encoder*" shortcuts.
LLAMA = {
    "decoder": r"model",
    "decoder_block": rf"model\.layers\.{_B}",
    "decoder_sublayer": rf"model\.layers\.{_B}\.(self_attn|mlp)",
    "decoder_linear": rf"model\.layers\.{_B}\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)",
    "decoder_final_ln": r"model\.norm",
    "lora_hosts": r".*\.(self_attn|mlp)",
    "lora_children": r"(q|k|v|o|gate|up|down)_proj",
}
GPT2 = {  # c_attn is GPT-2's fused q, k, v projection: one LoRA / one expert on it, as PEFT's GPT-2 target
    "decoder": r"transformer",
    "decoder_block": rf"transformer\.h\.{_B}",
    "decoder_sublayer": rf"transformer\.h\.{_B}\.(attn|mlp)",
    "decoder_linear": rf"transformer\.h\.{_B}\.(attn\.(c_attn|c_proj)|mlp\.(c_fc|c_proj))",
    "decoder_final_ln": r"transformer\.ln_f",
    "lora_hosts": r".*\.(attn|mlp)",
    "lora_children": r"c_attn|c_proj|c_fc",
}

SHORTCUTS = {T5_ARCHITECTURE: {**SHARED, **T5}, LLAMA_ARCHITECTURE: {**SHARED, **LLAMA},
             GPT2_ARCHITECTURE: {**SHARED, **GPT2}}

# HF config.model_type -> architecture (the models whose module names follow one of the tables above)
MODEL_TYPES = {"t5": T5_ARCHITECTURE, "mt5": T5_ARCHITECTURE, "umt5": T5_ARCHITECTURE,
               "llama": LLAMA_ARCHITECTURE, "mistral": LLAMA_ARCHITECTURE, "qwen2": LLAMA_ARCHITECTURE,
               "gpt2": GPT2_ARCHITECTURE}


def architecture_of(torch_model) -> str:
    model_type = getattr(getattr(torch_model, "config", None), "model_type", "")
    if model_type in MODEL_TYPES:
        return MODEL_TYPES[model_type]
    raise NotImplementedError(
        f"No module-name shortcuts for model_type {model_type!r}; add them to colm/models/module_names.py."
    )


def to_regex(pattern, architecture: str = "t5") -> str:
    table = SHORTCUTS[architecture]
    if isinstance(pattern, (list, tuple)):
        return "|".join(f"(?:{to_regex(p, architecture)})" for p in pattern)
    if len(pattern) >= 2 and pattern[0] == pattern[-1] and pattern[0] in "\"'":
        return re.escape(pattern[1:-1])
    return table.get(pattern, pattern)


def match_modules(torch_model, pattern, architecture: str = "t5") -> dict:
    """{name: module} for every module whose full name matches the pattern (addon modules excluded)."""
    regex = re.compile(to_regex(pattern, architecture))
    return {
        name: module
        for name, module in torch_model.named_modules()
        if "._addons." not in f".{name}." and regex.fullmatch(name)
    }
