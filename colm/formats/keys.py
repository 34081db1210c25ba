"""Checkpoint key formats: the one place that knows how keys are spelled (T5 layout, spec 3.6).

`<m>` is a module path of the model (a linear layer, or a whole stack for a per-stack router).

- plain LoRA (LoRALinear):  `<m>.expert_lora_a` (r x d_in), `<m>.expert_lora_b` (d_out x r)
- MoE format, expert i:     `<m>._addons.expert_lora.layer1__<i>` (d_in x r),
                            `<m>._addons.expert_lora.layer2__<i>` (r x d_out),
                            `<m>._addons.router.expert_embeddings__<i>` (d_router)
- PHATGOOSE gate:           `<m>._addons.expert_lora.expert_input_gate` (d_in)
- whole-stack routers:      `decoder._addons.router.expert_embeddings__<i>` (A1),
                            `encoder._addons.router.expert_embeddings__<i>` (retrieval)
- tied embeddings that released checkpoints carry: `encoder.embed_tokens.weight`, `decoder.embed_tokens.weight`
"""

import re
from dataclasses import dataclass

EXPERT_ADDON = "expert_lora"
ROUTER_ADDON = "router"
LAYER1 = "layer1"
LAYER2 = "layer2"
EMBEDDINGS = "expert_embeddings"
INPUT_GATE = "expert_input_gate"
OUTPUT_GATE = "expert_output_gate"
EMBEDDING_KEYS = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")

# (addon, parameter) pairs that carry an expert index.
_PARAMS = {LAYER1: EXPERT_ADDON, LAYER2: EXPERT_ADDON, EMBEDDINGS: ROUTER_ADDON}

INDEXED_KEY = re.compile(
    r"(?P<module>.+)\._addons\."
    r"(?:expert_lora\.(?P<expert_param>layer1|layer2)|router\.(?P<router_param>expert_embeddings))"
    r"__(?P<index>\d+)"
)
GATE_KEY = re.compile(r"(?P<module>.+)\._addons\.expert_lora\.(?P<param>expert_input_gate|expert_output_gate)")
LORA_KEY = re.compile(r"(?P<module>.+)\.expert_lora_(?P<factor>[ab])")
@dataclass(frozen=True)
class IndexedKey:
    """A parsed `<module>._addons.<addon>.<param>__<index>` key."""

    module: str
    param: str  # "layer1", "layer2" or "expert_embeddings"
    index: int

    @property
    def addon(self) -> str:
        return _PARAMS[self.param]

    @property
    def is_router(self) -> bool:
        return self.param == EMBEDDINGS

    @property
    def prefix(self) -> str:
        """`<module>._addons.<addon>.`: what precedes `<param>__<index>`."""
        return f"{self.module}._addons.{self.addon}."

    @property
    def key(self) -> str:
        return f"{self.prefix}{self.param}__{self.index}"

    def with_index(self, index: int) -> "IndexedKey":
        return IndexedKey(self.module, self.param, index)


def parse_indexed(key: str):
    """IndexedKey for an expert/router key, None for any other key."""
    match = INDEXED_KEY.fullmatch(key)
    if match is None:
        return None
    param = match["expert_param"] or match["router_param"]
    return IndexedKey(match["module"], param, int(match["index"]))


def parse_lora(key: str):
    """(module, "a" or "b") for a plain LoRA key `<m>.expert_lora_a|b`, None for any other key."""
    match = LORA_KEY.fullmatch(key)
    return (match["module"], match["factor"]) if match else None


def lora_key(module: str, factor: str) -> str:
    return f"{module}.expert_lora_{factor}"


def layer1_key(module: str, index: int) -> str:
    return IndexedKey(module, LAYER1, index).key


def layer2_key(module: str, index: int) -> str:
    return IndexedKey(module, LAYER2, index).key


def router_key(module: str, index: int) -> str:
    return IndexedKey(module, EMBEDDINGS, index).key


def gate_key(module: str, param: str = INPUT_GATE) -> str:
    return f"{module}._addons.{EXPERT_ADDON}.{param}"


def is_embedding_key(key: str) -> bool:
    return key in EMBEDDING_KEYS


def parse_gate(key: str):
    """(module, "expert_input_gate" or "expert_output_gate") for a gate key, None for any other key."""
    match = GATE_KEY.fullmatch(key)
    return (match["module"], match["param"]) if match else None


def is_gate_key(key: str) -> bool:
    return parse_gate(key) is not None


def is_input_gate_key(key: str) -> bool:
    parsed = parse_gate(key)
    return parsed is not None and parsed[1] == INPUT_GATE


def is_router_key(key: str) -> bool:
    parsed = parse_indexed(key)
    return parsed is not None and parsed.is_router


def is_expert_key(key: str) -> bool:
    parsed = parse_indexed(key)
    return parsed is not None and not parsed.is_router


def embedding_entries(state: dict) -> dict:
    """The embedding keys a checkpoint carries (possibly none), in the checkpoint's order."""
    return {k: v for k, v in state.items() if is_embedding_key(k)}


def indexed_entries(state: dict) -> dict:
    """{IndexedKey: tensor} for every expert/router key, in the checkpoint's order."""
    out = {}
    for key, value in state.items():
        parsed = parse_indexed(key)
        if parsed is not None:
            out[parsed] = value
    return out


def group(state: dict) -> dict:
    """{(module, param): {index: tensor}} for every expert/router key; modules in first-seen order.

    One pass over the keys: a 166-expert T5-XL checkpoint has about 200 000 of them.
    """
    groups = {}
    for parsed, value in indexed_entries(state).items():
        groups.setdefault((parsed.module, parsed.param), {})[parsed.index] = value
    return groups


def modules_with(state: dict, param: str) -> list:
    """Module paths that have at least one `param` key (layer1, layer2 or expert_embeddings), first-seen order."""
    return [module for module, p in group(state) if p == param]


def expert_modules(state: dict) -> list:
    return modules_with(state, LAYER1)


def router_modules(state: dict) -> list:
    return modules_with(state, EMBEDDINGS)


def expert_indices(state: dict) -> list:
    """Sorted expert indices that occur in any expert or router key."""
    return sorted({p.index for p in indexed_entries(state)})


def expert_count(state: dict) -> int:
    """Number of experts after validate_experts (indices are 0..N-1); 0 when there are no expert keys."""
    layer1 = [set(g) for (module, p), g in group(state).items() if p == LAYER1]
    return len(set().union(*layer1)) if layer1 else 0


def check_contiguous(indices, what: str) -> None:
    """Experts are created in index order at load time, so indices must be exactly 0..N-1."""
    indices = sorted(indices)
    if indices != list(range(len(indices))):
        missing = sorted(set(range(max(indices, default=-1) + 1)) - set(indices))
        raise ValueError(
            f"{what}: expert indices must be 0..N-1 without gaps, found {_summary(indices)}"
            + (f" (missing {_summary(missing)})" if missing else "")
            + ". Re-create the checkpoint with consecutive indices (e.g. concatenate_two_checkpoints with "
            "index = the number of experts in the first checkpoint)."
        )


def validate_experts(state: dict, what: str) -> None:
    """Checks that experts are complete and consistent; raises naming the first problem.

    Per module: layer1 and layer2 have the same contiguous indices 0..N-1 and matching ranks
    (layer1_i d_in x r, layer2_i r x d_out); a module with both experts and a router has a router vector
    for every expert and no other; every router's indices are contiguous and its vectors one-dimensional.
    """
    groups = group(state)
    modules = dict.fromkeys(m for m, p in groups if p in (LAYER1, LAYER2))
    for module in modules:
        ones = groups.get((module, LAYER1), {})
        twos = groups.get((module, LAYER2), {})
        if sorted(ones) != sorted(twos):
            raise ValueError(
                f"{what}: module {module} has layer1 for experts {_summary(sorted(ones))} but layer2 for "
                f"{_summary(sorted(twos))}; every expert needs both factors."
            )
        check_contiguous(ones, f"{what}, module {module}")
        for i in ones:
            one, two = ones[i], twos[i]
            if one.dim() != 2 or two.dim() != 2 or one.shape[1] != two.shape[0]:
                raise ValueError(
                    f"{what}: expert {i} of {module} has layer1 {tuple(one.shape)} and layer2 {tuple(two.shape)}; "
                    "expected (d_in x r) and (r x d_out)."
                )
        routers = groups.get((module, EMBEDDINGS), {})
        if routers and sorted(routers) != sorted(ones):
            raise ValueError(
                f"{what}: module {module} has experts {_summary(sorted(ones))} but router vectors "
                f"{_summary(sorted(routers))}; each expert needs exactly one router vector "
                "(create_router_embeddings adds zero ones)."
            )
    for (module, param), vectors in groups.items():
        if param != EMBEDDINGS:
            continue
        check_contiguous(vectors, f"{what}, router {module}")
        for i, vector in vectors.items():
            if vector.dim() != 1:
                raise ValueError(f"{what}: router vector {router_key(module, i)} has shape {tuple(vector.shape)}; "
                                 "expected one dimension.")


def _summary(indices) -> str:
    indices = list(indices)
    if len(indices) <= 8:
        return str(indices)
    return f"[{indices[0]}, {indices[1]}, ..., {indices[-1]}] ({len(indices)} indices)"
