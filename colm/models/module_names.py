"""Module-name shortcuts: one place that knows how each architecture names its modules.

A pattern is a shortcut name, a raw regular expression, a quoted string (taken literally) or a list
(OR-joined). Patterns are full-matched against `named_modules()` names.
"""

import re

from colm.models.architecture import T5 as T5_ARCHITECTURE

SHARED = {
    "all": r".*",
    "model": r"",
    "nothing": r"(?!)",
    "none": r"(?!)",
    "expert": r".*expert.*",
    "gate": r".*gate.*",
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
}

SHORTCUTS = {T5_ARCHITECTURE: {**SHARED, **T5}}


def architecture_of(torch_model) -> str:
    model_type = getattr(getattr(torch_model, "config", None), "model_type", "")
    if model_type in ("t5", "mt5", "umt5"):
        return T5_ARCHITECTURE
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
