"""HF PEFT LoRA adapters in and out of colm's expert format: format conversion only, no model is built.

A PEFT adapter directory (`save_pretrained`):
    adapter_config.json        r, lora_alpha, use_rslora, target_modules, rank_pattern, alpha_pattern, ...
    adapter_model.safetensors  `base_model.model.<m>.lora_A.weight` (r x d_in), `...lora_B.weight` (d_out x r)

PEFT adds `scale * x A^T B^T` to the linear `<m>`, scale = lora_alpha / r (lora_alpha / sqrt(r) with use_rslora).
colm's expert adds `(x layer1 layer2) / d_bottleneck`, d_bottleneck being FFNExperts.d_bottleneck of the model
that runs it (16 in every shipped gin, whatever the expert's own rank; 1 with divide_by_d_bottleneck=False). So

    import: layer1 = A^T, layer2 = B^T * scale * d_bottleneck
    export: A = layer1^T, B = layer2^T, lora_alpha = r / d_bottleneck (PEFT's scale is then 1 / d_bottleneck)

and the colm checkpoint is the one put_index_to_lora makes from a trained LoRA (colm/checkpoints/experts.py):
`<m>._addons.expert_lora.layer1__0`, `layer2__0` and a zero router vector `expert_embeddings__0`.

A PHATGOOSE-routed set is exported as one adapter directory per expert, ROUTER_FILE holding the router vectors
under colm's own keys `<m>._addons.router.expert_embeddings__<i>`, and ROUTING_FILE naming the experts in index
order and the routing rule.
"""

import json
import math
import os
import re

import torch

from colm.formats import keys as K
from colm.utils.atomic import atomic_path

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLED_WEIGHTS_FILE = "adapter_model.bin"
ROUTER_FILE = "router.safetensors"
ROUTING_FILE = "routing.json"
PREFIX = "base_model.model."
PEFT_KEY = re.compile(re.escape(PREFIX) + r"(?P<module>.+)\.lora_(?P<factor>[AB])\.weight")

# PEFT keys colm cannot represent, by what they betray (first match wins).
_FOREIGN_KEYS = (
    ("lora_magnitude_vector", 'DoRA (use_dora=true)'),
    ("modules_to_save", "modules_to_save (whole modules trained beside the LoRA)"),
    ("trainable_tokens", "trainable_token_indices (trained embedding rows)"),
    ("lora_embedding_", "LoRA on an embedding layer"),
    (".bias", 'trained biases (bias != "none" or lora_bias=true)'),
)

# adapter_config.json settings colm cannot represent: (field, why, fix). A falsy value is always accepted.
_REFUSED_SETTINGS = (
    ("use_dora", "DoRA rescales each column of the base weight by a trained magnitude; a colm expert only adds "
                 "x layer1 layer2", "use a plain LoRA (use_dora=false)"),
    ("modules_to_save", "it trains whole copies of these modules beside the LoRA", "train without modules_to_save"),
    ("fan_in_fan_out", "it describes Conv1D layers that store their weight as d_in x d_out (GPT-2); colm's experts "
                       "sit beside nn.Linear layers",
     'if the adapter was trained on nn.Linear layers (PEFT ignores the flag there), set "fan_in_fan_out": false '
     "in the file"),
    ("lora_bias", "it trains a bias on lora_B", "train with lora_bias=false"),
    ("trainable_token_indices", "it trains embedding rows", "train without trainable_token_indices"),
    ("target_parameters", "it adapts raw parameters, not linear layers", "target linear modules instead"),
    ("layer_replication", "it duplicates layers of the base model", "train without layer_replication"),
    ("alora_invocation_tokens", "activated LoRA applies only after its invocation tokens", "use a plain LoRA"),
    ("use_qalora", "QA-LoRA pools the input of a quantised layer", "use a plain LoRA"),
    ("use_bdlora", "colm does not read BD-LoRA's block-diagonal factors", "use a plain LoRA"),
    ("loftq_config", "LoftQ adapters correct a quantised copy of the base model", "use a plain LoRA"),
    ("arrow_config", "it routes between several adapters inside PEFT", "import the adapters one by one"),
    ("kasa_config", "KaSA truncates the base weight and scales the rank by a trained diagonal", "use a plain LoRA"),
    ("monteclora_config", "MonteCLoRA samples perturbations of the LoRA weights", "use a plain LoRA"),
)

# The rule ROUTING_FILE states; the computation itself is colm/moma/routing.py ("original" score, A2).
ROUTING_RULE = {
    "router_input": "x, the input of the linear <module> at each token",
    "standardise": "x and every router vector: subtract the mean, divide by sqrt(biased variance + 1e-5), no affine",
    "score": "dot(standardised x, standardised router vector of expert i) / sqrt(d_in)",
    "probabilities": "softmax of the scores over the experts",
    "top_k": 2,
    "renormalise": "divide the top_k probabilities by (their sum + 1e-6)",
    "output": "linear(x) + sum over the top_k experts i of p_i * (adapter i's LoRA update of <module>)",
}


# ------------------------------------------------------------------------------------------------ reading PEFT
def read_adapter(directory: str):
    """(config dict, weights file, {key: tensor}) of a PEFT adapter directory; refuses settings colm cannot
    represent."""
    config_file = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{config_file} does not exist: give the directory PEFT's save_pretrained wrote "
                                f"(it holds {CONFIG_FILE} and {WEIGHTS_FILE}).")
    try:
        with open(config_file) as f:
            config = json.load(f)
    except (OSError, ValueError) as error:
        raise ValueError(f"{config_file} is not readable JSON: {error}") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        found = config.get("peft_type") if isinstance(config, dict) else None
        raise ValueError(f"{config_file}: peft_type is {found!r}; colm imports LoRA adapters only "
                         '("peft_type": "LORA").')
    _refuse_settings(config, config_file)
    return (config, *_read_weights(directory))


def _refuse_settings(config: dict, config_file: str) -> None:
    bias = config.get("bias", "none")
    if bias != "none":
        raise ValueError(f'{config_file}: "bias": {json.dumps(bias)} trains the base model\'s biases, which a colm '
                         'expert cannot carry. Train the adapter with bias="none".')
    for field, why, fix in _REFUSED_SETTINGS:
        value = config.get(field)
        if value:
            raise ValueError(f"{config_file}: \"{field}\": {json.dumps(value)} is not supported: {why}. Fix: {fix}.")


def _read_weights(directory: str):
    """(file, {key: tensor})."""
    path = os.path.join(directory, WEIGHTS_FILE)
    if os.path.isfile(path):
        from safetensors.torch import load_file

        try:
            return path, load_file(path)
        except Exception as error:
            raise ValueError(f"Could not read {path}: {error}. Copy the adapter again.") from None
    path = os.path.join(directory, PICKLED_WEIGHTS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory} holds neither {WEIGHTS_FILE} nor {PICKLED_WEIGHTS_FILE}.")
    try:  # weights_only: a pickled file never runs code here
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"Could not read {path} as plain tensors ({str(error).strip().splitlines()[0]}); colm never "
                         f"unpickles code. Re-save it as safetensors in a trusted environment "
                         f"(PeftModel.save_pretrained(..., safe_serialization=True)).") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a flat {{key: tensor}} dict.")
    return path, state


def _factors(tensors: dict, weights_file: str) -> dict:
    """{module: {"A": tensor, "B": tensor}} in file order; any other key is refused, saying what it betrays."""
    factors = {}
    for key, value in tensors.items():
        match = PEFT_KEY.fullmatch(key)
        if match is None:
            what = next((name for part, name in _FOREIGN_KEYS if part in key), None)
            reason = f"it belongs to {what}, which" if what else "it is not a LoRA factor " \
                f"({PREFIX}<module>.lora_A.weight / lora_B.weight) and"
            raise ValueError(f"{weights_file}: key {key!r} cannot be imported: {reason} a colm expert cannot "
                             "represent. Export the adapter as a plain LoRA on linear layers.")
        factors.setdefault(match["module"], {})[match["factor"]] = value
    if not factors:
        raise ValueError(f"{weights_file} holds no LoRA factors ({PREFIX}<module>.lora_A.weight).")
    for module, ab in factors.items():
        if set(ab) != {"A", "B"}:
            missing = "B" if "A" in ab else "A"
            raise ValueError(f"{weights_file}: {PREFIX}{module}.lora_{missing}.weight is missing; every adapted "
                             "module needs both factors.")
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"{weights_file}: {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; "
                             "expected (r x d_in) and (d_out x r).")
    return factors


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key k with `(.*\\.)?(k)$` matching the module."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def peft_scale(config: dict, module: str) -> float:
    """The factor PEFT multiplies the module's B A x by."""
    r = _pattern_value(config.get("rank_pattern"), module, config.get("r", 8))
    alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8))
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def _targets(config: dict, module: str) -> bool:
    """Whether target_modules / exclude_modules name the module (PEFT's rule: a string is a full-match regex,
    a list names modules or their last parts)."""
    def named(spec):
        if isinstance(spec, str):
            return spec == "all-linear" or re.fullmatch(spec, module) is not None
        return any(module == name or module.endswith("." + name) for name in spec)

    excluded = config.get("exclude_modules")
    targets = config.get("target_modules")
    return not (excluded and named(excluded)) and (targets is None or named(targets))


# ------------------------------------------------------------------------------------------------ import
def import_adapter(directory: str, d_bottleneck: float = 16, base_linears=None) -> dict:
    """A PEFT LoRA adapter directory as a one-expert colm checkpoint ({key: tensor}, expert index 0).

    d_bottleneck: FFNExperts.d_bottleneck of the model that will run the expert (the divisor of its update).
    base_linears: {module: (d_in, d_out)} of every linear colm puts experts on in the base model (None: not
    checked). Every adapted module must be one of them with the same shape; those the adapter leaves alone get a
    zero expert of its rank, so the checkpoint loads into colm's models, which have experts on all of them.
    """
    config, weights_file, tensors = read_adapter(directory)
    factors = _factors(tensors, weights_file)
    out = {}
    for module, ab in factors.items():
        a, b = ab["A"], ab["B"]
        key = f"{PREFIX}{module}.lora_A.weight"
        r = _pattern_value(config.get("rank_pattern"), module, config.get("r", 8))
        if a.shape[0] != r:
            raise ValueError(f"{weights_file}: {key} has rank {a.shape[0]} but {CONFIG_FILE} gives r={r} for "
                             f"{module}; the weights and the config come from different adapters.")
        if not _targets(config, module):
            raise ValueError(f"{weights_file}: {key} adapts {module}, which target_modules="
                             f"{config.get('target_modules')!r} (exclude_modules={config.get('exclude_modules')!r}) "
                             f"in {CONFIG_FILE} does not name; the weights and the config come from different "
                             "adapters.")
        if base_linears is not None:
            _check_base(module, a, b, base_linears, key, weights_file)
        factor = peft_scale(config, module) * d_bottleneck
        layer2 = b.t() if factor == 1 else (b.t().double() * factor).to(b.dtype)  # one rounding
        out[K.layer1_key(module, 0)] = a.t().contiguous()
        out[K.layer2_key(module, 0)] = layer2.contiguous()
        out[K.router_key(module, 0)] = torch.zeros(a.shape[1], dtype=a.dtype)
    if base_linears is not None:
        rank, dtype = config.get("r", 8), next(iter(tensors.values())).dtype
        for module, (d_in, d_out) in base_linears.items():
            if module not in factors:
                out[K.layer1_key(module, 0)] = torch.zeros(d_in, rank, dtype=dtype)
                out[K.layer2_key(module, 0)] = torch.zeros(rank, d_out, dtype=dtype)
                out[K.router_key(module, 0)] = torch.zeros(d_in, dtype=dtype)
    return out


def _check_base(module, a, b, base_linears, key, weights_file) -> None:
    if module not in base_linears:
        example = next(iter(base_linears), "none")
        raise ValueError(f"{weights_file}: {key} adapts {module}, which is not one of the base model's "
                         f"{len(base_linears)} linears colm puts experts on (e.g. {example}). The adapter was "
                         "trained on another base model or on other modules: import it against its own base model.")
    d_in, d_out = base_linears[module]
    if (a.shape[1], b.shape[0]) != (d_in, d_out):
        raise ValueError(f"{weights_file}: {module} maps {a.shape[1]} -> {b.shape[0]} features but the base model's "
                         f"{module} maps {d_in} -> {d_out}: the adapter was trained on another base model size.")


# ------------------------------------------------------------------------------------------------ export
def expert_factors(state: dict, index=None, what: str = "checkpoint") -> dict:
    """{module: (layer1, layer2)} of expert `index` of a colm checkpoint (None: the checkpoint must hold one)."""
    if any(K.parse_lora(k) for k in state):
        raise ValueError(f"{what} is a plain LoRA checkpoint (expert_lora_a / expert_lora_b keys); convert it with "
                         "put_index_to_lora first.")
    K.validate_experts(state, what)
    count = K.expert_count(state)
    if count == 0:
        raise ValueError(f"{what} holds no experts (no <module>._addons.expert_lora.layer1__<i> keys).")
    if index is None:
        if count != 1:
            raise ValueError(f"{what} holds {count} experts; give the index of the one to export (0..{count - 1}).")
        index = 0
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < count:
        raise ValueError(f"{what}: no expert with index {index!r}; it holds experts 0..{count - 1}.")
    groups = K.group(state)
    return {module: (ones[index], groups[(module, K.LAYER2)][index])
            for (module, param), ones in groups.items() if param == K.LAYER1}


def adapter_files(factors: dict, d_bottleneck: float = 16, base_model=None, task_type=None):
    """(adapter_config dict, {key: tensor}) of a PEFT adapter computing what colm's expert computes.

    r is the most common rank; modules of another rank get it in rank_pattern (and their alpha in alpha_pattern),
    keyed by the escaped module name.
    """
    ranks = {module: layer1.shape[1] for module, (layer1, _) in factors.items()}
    counts = list(ranks.values())
    r = max(set(counts), key=counts.count)
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": _alpha(r, d_bottleneck),
        "rank_pattern": {re.escape(m): rank for m, rank in ranks.items() if rank != r},
        "alpha_pattern": {re.escape(m): _alpha(rank, d_bottleneck) for m, rank in ranks.items() if rank != r},
        "use_rslora": False,
        "target_modules": list(factors),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "inference_mode": True,
    }
    tensors = {}
    for module, (layer1, layer2) in factors.items():
        tensors[f"{PREFIX}{module}.lora_A.weight"] = layer1.t().contiguous()
        tensors[f"{PREFIX}{module}.lora_B.weight"] = layer2.t().contiguous()
    return config, tensors


def _alpha(rank: int, d_bottleneck: float):
    """lora_alpha giving PEFT's scale alpha / rank = 1 / d_bottleneck."""
    alpha = rank / d_bottleneck
    return int(alpha) if float(alpha).is_integer() else alpha


def write_adapter(factors: dict, directory: str, d_bottleneck: float = 16, base_model=None, task_type=None,
                  overwrite: bool = False) -> str:
    """Writes a PEFT adapter directory (CONFIG_FILE, WEIGHTS_FILE; each atomically) that PeftModel.from_pretrained
    loads; refuses to replace an existing adapter unless overwrite."""
    _refuse_existing([os.path.join(directory, name) for name in (CONFIG_FILE, WEIGHTS_FILE)], overwrite)
    config, tensors = adapter_files(factors, d_bottleneck, base_model, task_type)
    from safetensors.torch import save_file

    with atomic_path(os.path.join(directory, WEIGHTS_FILE)) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    _write_json(config, os.path.join(directory, CONFIG_FILE))
    return directory


def export_expert(state: dict, directory: str, index=None, d_bottleneck: float = 16, base_model=None,
                  task_type=None, overwrite: bool = False, what: str = "checkpoint") -> str:
    """Expert `index` of a colm checkpoint (None: its only expert) as a PEFT adapter directory."""
    factors = expert_factors(state, index, what)
    return write_adapter(factors, directory, d_bottleneck, base_model, task_type, overwrite)


def export_routed_set(state: dict, directory: str, names=None, d_bottleneck: float = 16, base_model=None,
                      task_type=None, top_k: int = 2, overwrite: bool = False, what: str = "checkpoint") -> list:
    """Every expert of a concatenated PHATGOOSE checkpoint as `<directory>/<name>/` PEFT adapters, plus
    `<directory>/ROUTER_FILE` (router vectors, colm's keys) and `<directory>/ROUTING_FILE` (order and rule).

    names: one directory name per expert in index order (None: expert_000, expert_001, ...). Returns the
    adapter directories in index order.
    """
    K.validate_experts(state, what)
    count = K.expert_count(state)
    names = [f"expert_{i:03d}" for i in range(count)] if names is None else [str(n) for n in names]
    if len(names) != count:
        raise ValueError(f"{what} holds {count} experts but {len(names)} names were given.")
    bad = [n for n in names if not n or n in (".", "..") or "/" in n or os.sep in n]
    if bad or len(set(names)) != len(names):
        raise ValueError(f"Expert names must be distinct directory names without '/', got e.g. "
                         f"{bad[:3] or sorted(n for n in names if names.count(n) > 1)[:3]}.")
    experts, routers = K.expert_modules(state), K.router_modules(state)
    if set(routers) != set(experts):
        differing = sorted(set(routers) ^ set(experts))
        raise ValueError(f"{what}: PHATGOOSE routes every expert linear by its own router vectors, but the router "
                         f"modules differ from the expert modules (e.g. {differing[:3]}). A checkpoint without router "
                         "vectors needs use_input_gate_as_router per expert before concatenation; whole-stack routers "
                         "(A1, retrieval) are not exported.")
    router_file = os.path.join(directory, ROUTER_FILE)
    routing_file = os.path.join(directory, ROUTING_FILE)
    _refuse_existing([router_file, routing_file], overwrite)
    out = [export_expert(state, os.path.join(directory, name), i, d_bottleneck, base_model, task_type, overwrite,
                         what) for i, name in enumerate(names)]
    from safetensors.torch import save_file

    vectors = {key: value.contiguous() for key, value in state.items() if K.is_router_key(key)}
    with atomic_path(router_file) as tmp:
        save_file(vectors, tmp, metadata={"format": "pt"})
    _write_json({
        "experts": [{"index": i, "name": name, "adapter": name} for i, name in enumerate(names)],
        "router_file": ROUTER_FILE,
        "router_keys": "<module>._addons.router.expert_embeddings__<index>",
        "rule": {**ROUTING_RULE, "top_k": min(top_k, count)},
    }, routing_file)
    return out


def _refuse_existing(paths, overwrite: bool) -> None:
    existing = [p for p in paths if os.path.exists(p)]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} exists; choose another output directory or pass overwrite "
                              "(--overwrite) to replace it.")


def _write_json(data: dict, path: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
