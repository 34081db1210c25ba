"""Offline checkpoint surgery (spec 4.3, 4.5, 4.7, 4.8, 4.9): functions on flat {key: tensor} dicts.

Every operation comes twice: a pure function `<name>_state(...)` on dicts (what tests use), and a
gin-configurable file-level wrapper `<name>(path, out_path, ...)` that reads `exp_out/<path>/best.pt` and
writes `exp_out/<out_path>/best.pt` atomically. Paths are relative to `EXP_OUT`. Bad input is refused
before anything is written, so an existing output is never destroyed. Key spellings live in `keys.py`.

Conventions: layer1_i is d_in x r, layer2_i is r x d_out, and expert i adds (x @ layer1_i @ layer2_i) / r,
so its dense update is dW_i = layer1_i @ layer2_i / r (d_in x d_out, applied as x @ dW_i).
"""

import json
import os
import re

import gin
import numpy as np
import torch

from colm.checkpoints import keys as K
from colm.checkpoints.expert_order import get_setting, is_listed, setting_containing
from colm.models.module_names import to_regex
from colm.moma.weights import read_checkpoint, write_checkpoint
from colm.utils.paths import expand
from colm.utils.run_dir import unfinished_warning

EXP_OUT = "exp_out"
ROUTER_METHODS = ("simple", "eigen_weighted_vector", "top1_eigen_weighted_vector")


# ----------------------------------------------------------------------------------------------------------
# Paths and file I/O


def checkpoint_file(path: str, what: str = "path") -> str:
    """`<EXP_OUT>/<path>/best.pt` for an experiment path such as `datasets_concatenated/P3Socialiqa_t5xl_lora`."""
    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"{what} must be a non-empty experiment path relative to {EXP_OUT}/, got {path!r}.")
    path = expand(path, what).rstrip("/")
    first = path.split("/")[0]
    if os.path.isabs(path) or first in (EXP_OUT, "exp_out") or path.endswith(".pt"):
        raise ValueError(
            f"{what}={path!r}: give the experiment directory relative to {EXP_OUT}/, without {EXP_OUT}/ in front "
            f"and without best.pt (e.g. \"datasets_concatenated/P3Socialiqa_t5xl_lora\" for "
            f"{EXP_OUT}/datasets_concatenated/P3Socialiqa_t5xl_lora/best.pt)."
        )
    if ".." in path.split("/"):
        raise ValueError(f"{what}={path!r}: '..' is not allowed in experiment paths; they stay inside {EXP_OUT}/ "
                         "(name the directory relative to it, e.g. \"datasets_concatenated/<name>\").")
    return os.path.join(EXP_OUT, path, "best.pt")


def _refuse_in_place(function: str, out_path, *inputs) -> None:
    """A function with an output of its own refuses to write over one of its inputs (put_index_to_lora with
    out_path == path overwrote the stage-1 LoRA it read)."""
    out = checkpoint_file(out_path, f"{function}.out_path")
    for source in inputs:
        if isinstance(source, str) and os.path.normpath(checkpoint_file(source, function)) == os.path.normpath(out):
            raise ValueError(f"{function}: out_path={out_path!r} is its input {source!r}; writing there would replace "
                             "the input checkpoint. Give the result its own out_path (e.g. under datasets_concatenated/).")


def load(path: str, what: str = "path") -> dict:
    file = checkpoint_file(path, what)
    warning = unfinished_warning(file)
    if warning:
        print(warning)
    return read_checkpoint(file)


def save(state: dict, out_path: str, what: str = "out_path") -> str:
    file = checkpoint_file(out_path, what)
    write_checkpoint(state, file)
    print(f"[colm] wrote {len(state)} tensors to {file}")
    return file


def _without(state: dict, drop) -> dict:
    """A copy of state without the keys for which drop(key) is true (order kept)."""
    return {k: v for k, v in state.items() if not drop(k)}


def _refuse_unknown_keys(state: dict, what: str) -> None:
    """Merges need a pure expert checkpoint: only expert/router keys and the embedding keys."""
    unknown = [k for k in state if K.parse_indexed(k) is None and not K.is_embedding_key(k)]
    if unknown:
        raise ValueError(
            f"{what}: unexpected key(s) {unknown[:3]}{' ...' if len(unknown) > 3 else ''}; expected only expert "
            "(layer1/layer2), router (expert_embeddings) and embed_tokens keys. Remove gates first "
            "(delete_expert_input_gate)."
        )


def _refuse_non_finite(tensors, what: str) -> None:
    """Decompositions (QR, SVD) fail on NaN / Inf with a LinAlgError that names nothing: refuse them first."""
    for tensor in tensors:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{what} holds NaN or Inf values; the run that wrote it diverged. Use an earlier "
                             "checkpoint of that expert.")


def _mean(tensors) -> torch.Tensor:
    """Mean in float32 (checkpoints are often bf16), returned in the first tensor's dtype."""
    tensors = list(tensors)
    return torch.stack([t.float() for t in tensors]).mean(dim=0).to(tensors[0].dtype)


# ----------------------------------------------------------------------------------------------------------
# Stage 1b: plain LoRA -> MoE format (spec 4.3)


def put_index_to_lora_state(state: dict) -> dict:
    """`<m>.expert_lora_a` (r x d_in) -> `layer1__0` = A^T; `<m>.expert_lora_b` (d_out x r) -> `layer2__0` = B^T;
    a zero router vector `expert_embeddings__0` (d_in) per module; router keys of the input are dropped.

    x @ layer1 @ layer2 equals x @ A^T @ B^T, so the expert computes the same update as the LoRALinear.
    """
    factors = {}
    for key, value in state.items():
        if K.is_embedding_key(key) or K.is_router_key(key):
            continue
        lora = K.parse_lora(key)
        if lora is None:
            hint = " It is already in the MoE format." if K.is_expert_key(key) else ""
            raise ValueError(
                f"put_index_to_lora: unexpected key {key!r}; expected a LoRALinear checkpoint with "
                f"<module>.expert_lora_a / expert_lora_b keys (and embed_tokens).{hint}"
            )
        factors.setdefault(lora[0], {})[lora[1]] = value
    if not factors:
        raise ValueError("put_index_to_lora: no <module>.expert_lora_a/b keys found; is this a stage-1 LoRA "
                         "checkpoint?")
    out = K.embedding_entries(state)
    for module, ab in factors.items():
        if set(ab) != {"a", "b"}:
            missing = K.lora_key(module, "b" if "a" in ab else "a")
            raise ValueError(f"put_index_to_lora: {missing} is missing; every LoRA needs both factors.")
        a, b = ab["a"], ab["b"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"put_index_to_lora: {module} has expert_lora_a {tuple(a.shape)} and expert_lora_b {tuple(b.shape)}; "
                "expected (r x d_in) and (d_out x r)."
            )
        out[K.layer1_key(module, 0)] = a.t().contiguous()
        out[K.layer2_key(module, 0)] = b.t().contiguous()
        out[K.router_key(module, 0)] = torch.zeros(a.shape[1], dtype=a.dtype)
    return out


@gin.configurable
def put_index_to_lora(path=gin.REQUIRED, out_path=gin.REQUIRED):
    _refuse_in_place("put_index_to_lora", out_path, path)
    return save(put_index_to_lora_state(load(path)), out_path)


# ----------------------------------------------------------------------------------------------------------
# Gates (spec 4.5, 4.7)


def _input_gates(state: dict, what: str) -> dict:
    """{module: gate vector} of a one-expert checkpoint after gate training; refuses anything else."""
    gates = {K.parse_gate(k)[0]: v for k, v in state.items() if K.is_input_gate_key(k)}
    if not gates:
        raise ValueError(
            f"{what}: no <module>._addons.expert_lora.expert_input_gate keys; gate training "
            "(train_gate.sh, FFNExperts.learn_input_gate) writes them."
        )
    indices = K.expert_indices(state)
    if indices not in ([], [0]):
        raise ValueError(f"{what}: the checkpoint holds experts {indices[:5]}...; a gate belongs to a one-expert "
                         "checkpoint (index 0). Apply it before concatenation.")
    for module, gate in gates.items():
        layer1 = state.get(K.layer1_key(module, 0))
        for key in (K.layer1_key(module, 0), K.layer2_key(module, 0)):
            if key not in state:
                raise ValueError(f"{what}: {module} has a gate but its expert is incomplete ({key} is missing).")
        if gate.shape != (layer1.shape[0],):
            raise ValueError(f"{what}: gate of {module} has shape {tuple(gate.shape)}, expected ({layer1.shape[0]},) "
                             "= the expert's input size.")
    return gates


def use_input_gate_as_router_state(state: dict) -> dict:
    """Copies each gate g into `<m>._addons.router.expert_embeddings__0` (overwriting the zero vector).

    The gate key stays (concatenation drops it).
    """
    out = dict(state)
    for module, gate in _input_gates(state, "use_input_gate_as_router").items():
        out[K.router_key(module, 0)] = gate.clone()
    return out


@gin.configurable
def use_input_gate_as_router(path=gin.REQUIRED):
    """In place: overwrites exp_out/<path>/best.pt."""
    return save(use_input_gate_as_router_state(load(path)), path, "path")


def use_input_gate_in_router_and_expert_state(state: dict) -> dict:
    """Lets the expert apply sigmoid(g.x) itself: layer1 becomes [g | layer1] (d_in x (r+1)), layer2 gets a zero
    first row ((r+1) x d_out), so the extra bottleneck unit computes g.x without changing x @ layer1 @ layer2.
    The router vector is set to g as well; the gate key stays. Evaluate with FFNExperts.use_input_gate=True and
    d_bottleneck r+1, still dividing by r.
    """
    out = dict(state)
    for module, gate in _input_gates(state, "use_input_gate_in_router_and_expert").items():
        layer1 = state[K.layer1_key(module, 0)]
        layer2 = state[K.layer2_key(module, 0)]
        out[K.layer1_key(module, 0)] = torch.cat([gate.to(layer1.dtype)[:, None], layer1], dim=1)
        out[K.layer2_key(module, 0)] = torch.cat([torch.zeros(1, layer2.shape[1], dtype=layer2.dtype), layer2], dim=0)
        out[K.router_key(module, 0)] = gate.clone()
    return out


@gin.configurable
def use_input_gate_in_router_and_expert(path=gin.REQUIRED, out_path=gin.REQUIRED):
    _refuse_in_place("use_input_gate_in_router_and_expert", out_path, path)
    return save(use_input_gate_in_router_and_expert_state(load(path)), out_path)


def _delete(state: dict, is_deleted, function: str, what: str) -> dict:
    out = _without(state, is_deleted)
    if len(out) == len(state):
        print(f"[colm] {function}: the checkpoint has no {what}; nothing deleted.")
    return out


def delete_expert_input_gate_state(state: dict) -> dict:
    return _delete(state, K.is_input_gate_key, "delete_expert_input_gate", "expert_input_gate keys")


@gin.configurable
def delete_expert_input_gate(path=gin.REQUIRED, out_path=None):
    """out_path=None: in place."""
    return save(delete_expert_input_gate_state(load(path)), out_path or path)


# ----------------------------------------------------------------------------------------------------------
# Combining checkpoints


def concatenate_two_checkpoints_state(state1: dict, state2: dict, index: int) -> dict:
    """state1 plus every expert/router key of state2 with its index shifted by `index`.

    Other keys of state2 (embeddings, gates) are not copied. The result must have contiguous indices, so
    `index` is normally the number of experts in state1.
    """
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise ValueError(f"concatenate_two_checkpoints: index must be a non-negative integer, got {index!r}.")
    K.validate_experts(state1, "concatenate_two_checkpoints, first checkpoint")
    K.validate_experts(state2, "concatenate_two_checkpoints, second checkpoint")
    modules1, modules2 = set(K.expert_modules(state1)), set(K.expert_modules(state2))
    if modules1 != modules2:
        differing = sorted(modules1 ^ modules2)
        raise ValueError(f"concatenate_two_checkpoints: the checkpoints have experts on different modules, "
                         f"e.g. {differing[:3]}; both must come from the same architecture.")
    out = dict(state1)
    for parsed, value in K.indexed_entries(state2).items():
        key = parsed.with_index(parsed.index + index).key
        if key in out:
            raise ValueError(
                f"concatenate_two_checkpoints: {key} exists in both checkpoints after shifting by index={index}; "
                f"use index={K.expert_count(state1)} (the number of experts in the first checkpoint)."
            )
        out[key] = value
    K.validate_experts(out, f"concatenate_two_checkpoints with index={index}")
    return out


@gin.configurable
def concatenate_two_checkpoints(path1=gin.REQUIRED, path2=gin.REQUIRED, out_path=gin.REQUIRED, index=gin.REQUIRED):
    _refuse_in_place("concatenate_two_checkpoints", out_path, path1, path2)
    state = concatenate_two_checkpoints_state(load(path1, "path1"), load(path2, "path2"), index)
    return save(state, out_path)


# ----------------------------------------------------------------------------------------------------------
# Router vectors


def create_router_embeddings_state(state: dict, regex_pattern_list) -> dict:
    """Deletes every router vector, then adds a zero one per expert at each module that has experts and
    full-matches one of the patterns (module-name shortcuts such as "encoder_linear", or raw regexes)."""
    patterns = [regex_pattern_list] if isinstance(regex_pattern_list, str) else list(regex_pattern_list)
    if not patterns:
        raise ValueError("create_router_embeddings: regex_pattern_list is empty; e.g. [\"encoder_linear\", "
                         "\"decoder_linear\"].")
    regex = re.compile(to_regex(patterns))
    out = _without(state, K.is_router_key)
    added = 0
    for (module, param), experts in K.group(state).items():
        if param == K.LAYER1 and regex.fullmatch(module):
            for i in sorted(experts):
                out[K.router_key(module, i)] = torch.zeros(experts[i].shape[0], dtype=experts[i].dtype)
                added += 1
    if not added:
        raise ValueError(f"create_router_embeddings: no module with experts matches {patterns}; modules with "
                         f"experts look like {K.expert_modules(state)[:2]}.")
    return out


@gin.configurable
def create_router_embeddings(path=gin.REQUIRED, regex_pattern_list=gin.REQUIRED, out_path=None):
    return save(create_router_embeddings_state(load(path), regex_pattern_list), out_path or path)


def delete_router_embeddings_state(state: dict) -> dict:
    return _delete(state, K.is_router_key, "delete_router_embeddings", "router vectors")


@gin.configurable
def delete_router_embeddings(path=gin.REQUIRED, out_path=None):
    return save(delete_router_embeddings_state(load(path)), out_path or path)


def add_router_embeddings_state(states: list) -> dict:
    """The first checkpoint with each router vector replaced by the sum of that vector over all checkpoints."""
    if len(states) < 2:
        raise ValueError("add_router_embeddings: give at least two checkpoints in list_of_paths.")
    first = states[0]
    routers = [k for k in first if K.is_router_key(k)]
    if not routers:
        raise ValueError("add_router_embeddings: the first checkpoint has no router vectors.")
    for n, other in enumerate(states[1:], start=2):
        others = {k for k in other if K.is_router_key(k)}
        if others != set(routers):
            differing = sorted(others ^ set(routers))
            raise ValueError(f"add_router_embeddings: checkpoint {n} has other router keys than the first, "
                             f"e.g. {differing[:3]}; all must have the same routers and experts.")
        wrong = [k for k in routers if other[k].shape != first[k].shape]
        if wrong:
            raise ValueError(f"add_router_embeddings: checkpoint {n}: {wrong[0]} has shape "
                             f"{tuple(other[wrong[0]].shape)}, the first has {tuple(first[wrong[0]].shape)}.")
    out = dict(first)
    for key in routers:
        out[key] = sum(s[key].float() for s in states).to(first[key].dtype)
    return out


@gin.configurable
def add_router_embeddings(list_of_paths=gin.REQUIRED, out_path=gin.REQUIRED):
    _refuse_in_place("add_router_embeddings", out_path, *(list_of_paths if isinstance(list_of_paths, (list, tuple))
                                                         else [list_of_paths]))
    states = [load(p, "list_of_paths") for p in list_of_paths]
    return save(add_router_embeddings_state(states), out_path)


# ----------------------------------------------------------------------------------------------------------
# Router vectors from the expert weights (spec 4.8.4; Arrow routing)


def _sign_fixed(u: torch.Tensor) -> torch.Tensor:
    """Singular vectors are defined up to sign: make the largest-magnitude component positive."""
    return -u if u[torch.argmax(u.abs())] < 0 else u


def left_singular(layer1: torch.Tensor, layer2: torch.Tensor):
    """Left singular vectors U (d_in x k) and values S (k) of dW = layer1 @ layer2, in float64.

    Uses layer1 = Q R: dW = Q (R layer2), so only the small (r x d_out) matrix R @ layer2 is decomposed; exact.
    """
    q, r = torch.linalg.qr(layer1.double())
    u_small, s, _ = torch.linalg.svd(r @ layer2.double(), full_matrices=False)
    return q @ u_small, s


def router_vector_from_weights(layer1: torch.Tensor, layer2: torch.Tensor, method_type: str) -> torch.Tensor:
    """One d_in router vector from an expert's factors (float64).

    simple: mean of layer1's r columns. top1_eigen_weighted_vector: the top left singular vector of dW (Arrow),
    unit norm. eigen_weighted_vector: sum_k (S_k / sum S) U_k. Zero experts give a zero vector.
    """
    if method_type == "simple":
        return layer1.double().mean(dim=1)
    u, s = left_singular(layer1, layer2)
    if s.sum() <= 0:
        return torch.zeros(layer1.shape[0], dtype=torch.float64)
    if method_type == "top1_eigen_weighted_vector":
        return _sign_fixed(u[:, 0])
    if method_type == "eigen_weighted_vector":
        return sum((s[k] / s.sum()) * _sign_fixed(u[:, k]) for k in range(len(s)))
    raise ValueError(f"Unknown method_type {method_type!r}; choose one of {ROUTER_METHODS}.")


def create_router_embeddings_from_weights_state(state: dict, method_type: str) -> dict:
    """Deletes every router vector and computes a new one per expert and module from its weights."""
    if method_type == "backbone_eigen_weighted_vector":
        raise NotImplementedError(
            "backbone_eigen_weighted_vector needs each linear's frozen base weight W, which expert checkpoints do "
            "not hold (the original referenced an undefined variable here). Use one of " f"{ROUTER_METHODS}."
        )
    if method_type not in ROUTER_METHODS:
        raise ValueError(f"create_router_embeddings_from_weights: unknown method_type {method_type!r}; choose one "
                         f"of {ROUTER_METHODS}.")
    K.validate_experts(state, "create_router_embeddings_from_weights")
    for key, value in state.items():
        if K.is_expert_key(key):
            _refuse_non_finite([value], f"create_router_embeddings_from_weights: {key}")
    groups = K.group(state)
    out = _without(state, K.is_router_key)
    for (module, param), ones in groups.items():
        if param != K.LAYER1:
            continue
        twos = groups[(module, K.LAYER2)]
        for i in sorted(ones):
            vector = router_vector_from_weights(ones[i], twos[i], method_type)
            out[K.router_key(module, i)] = vector.to(ones[i].dtype)
    return out


@gin.configurable
def create_router_embeddings_from_weights(path=gin.REQUIRED, out_path=gin.REQUIRED, method_type=gin.REQUIRED):
    _refuse_in_place("create_router_embeddings_from_weights", out_path, path)
    return save(create_router_embeddings_from_weights_state(load(path), method_type), out_path)


# ----------------------------------------------------------------------------------------------------------
# Decoder routers (A1 and mixtures of two checkpoints, spec 4.9)


def _is_decoder_router(key: str) -> bool:
    parsed = K.parse_indexed(key)
    if parsed is None or not parsed.is_router:
        return False
    return parsed.module == "decoder" or parsed.module.startswith("decoder.")


def make_one_router_decoder_state(state: dict, matching_strings=("EncDecAttention.k", "EncDecAttention.v")) -> dict:
    """Per expert, the mean of the router vectors of the decoder modules whose name contains one of
    matching_strings becomes `decoder._addons.router.expert_embeddings__i`; all other decoder routers go."""
    matching = [matching_strings] if isinstance(matching_strings, str) else list(matching_strings)
    matched = [
        (module, vectors) for (module, param), vectors in K.group(state).items()
        if param == K.EMBEDDINGS and module.startswith("decoder.") and any(s in module for s in matching)
    ]
    if not matched:
        raise ValueError(f"make_one_router_decoder: no decoder router vectors on modules containing {matching}.")
    indices = sorted(matched[0][1])
    for module, vectors in matched:
        if sorted(vectors) != indices:
            raise ValueError(f"make_one_router_decoder: {module} has router vectors for experts {sorted(vectors)}, "
                             f"{matched[0][0]} for {indices}; all must have the same experts.")
        sizes = {v.shape for v in vectors.values()} | {matched[0][1][indices[0]].shape}
        if len(sizes) != 1:
            raise ValueError(f"make_one_router_decoder: router vectors of different sizes {sorted(sizes)} "
                             f"(e.g. {module}); only same-size vectors can be averaged.")
    out = _without(state, _is_decoder_router)
    for i in indices:
        out[K.router_key("decoder", i)] = _mean(vectors[i] for _, vectors in matched)
    return out


@gin.configurable
def make_one_router_decoder(path=gin.REQUIRED, out_path=gin.REQUIRED,
                            matching_strings=("EncDecAttention.k", "EncDecAttention.v")):
    _refuse_in_place("make_one_router_decoder", out_path, path)
    return save(make_one_router_decoder_state(load(path), matching_strings), out_path)


def make_a_specific_checkpoint_state(state1: dict, state2: dict) -> dict:
    """state1 with its decoder router vectors replaced by those of state2."""
    decoder2 = {k: v for k, v in state2.items() if _is_decoder_router(k)}
    if not decoder2:
        raise ValueError("make_a_specific_checkpoint: the second checkpoint has no decoder router vectors.")
    out = _without(state1, _is_decoder_router)
    out.update(decoder2)
    n_experts = K.expert_count(state1)
    for (module, _), vectors in K.group(decoder2).items():
        if n_experts and sorted(vectors) != list(range(n_experts)):
            raise ValueError(f"make_a_specific_checkpoint: router {module} of the second checkpoint has "
                             f"{len(vectors)} vectors, the first checkpoint has {n_experts} experts.")
    K.validate_experts(out, "make_a_specific_checkpoint")
    return out


@gin.configurable
def make_a_specific_checkpoint(path1=gin.REQUIRED, path2=gin.REQUIRED, out_path=gin.REQUIRED):
    _refuse_in_place("make_a_specific_checkpoint", out_path, path1, path2)
    state = make_a_specific_checkpoint_state(load(path1, "path1"), load(path2, "path2"))
    return save(state, out_path)


# ----------------------------------------------------------------------------------------------------------
# Rescaling experts


def normalize_expert_weights_state(state: dict, index=None, norm_value=None, keys_to_ignore=()) -> dict:
    """Rescales every expert matrix (layer1/layer2) whose Frobenius norm exceeds norm_value to exactly norm_value.

    index: only that expert (None: all); keys_to_ignore: keys containing any of these strings are kept.
    """
    if norm_value is None or not norm_value > 0:
        raise ValueError(f"normalize_expert_weights: norm_value must be a positive number, got {norm_value!r}.")
    if index is not None and index not in K.expert_indices(state):
        raise ValueError(f"normalize_expert_weights: no expert with index {index} (experts: "
                         f"{K.expert_indices(state)[:5]}...).")
    ignore = [keys_to_ignore] if isinstance(keys_to_ignore, str) else list(keys_to_ignore)
    out = dict(state)
    rescaled = 0
    for key, value in state.items():
        parsed = K.parse_indexed(key)
        if parsed is None or parsed.is_router or (index is not None and parsed.index != index):
            continue
        if any(s in key for s in ignore):
            continue
        norm = value.float().norm()
        if norm > norm_value:
            out[key] = (value.float() * (norm_value / norm)).to(value.dtype)
            rescaled += 1
    print(f"[colm] normalize_expert_weights: rescaled {rescaled} matrices to norm {norm_value}.")
    return out


@gin.configurable
def normalize_expert_weights(path=gin.REQUIRED, out_path=gin.REQUIRED, index=None, norm_value=None,
                             keys_to_ignore=()):
    _refuse_in_place("normalize_expert_weights", out_path, path)
    state = normalize_expert_weights_state(load(path), index, norm_value, keys_to_ignore)
    return save(state, out_path)


# ----------------------------------------------------------------------------------------------------------
# Block-level routers and removing parts (spec 4.9)


def _block_routers(state: dict, what: str) -> dict:
    """{block: [(module, {index: vector}), ...]} for router vectors of modules inside encoder/decoder blocks."""
    blocks = {}
    for (module, param), vectors in K.group(state).items():
        block = K.block_of(module)
        if param == K.EMBEDDINGS and block is not None and module != block:
            sizes = sorted({tuple(v.shape) for v in vectors.values()})
            if len(sizes) != 1:
                raise ValueError(f"{what}: the router vectors of {module} have different shapes {sizes}; every "
                                 "expert's router vector at a module must have the module's input size.")
            blocks.setdefault(block, []).append((module, vectors))
    if not blocks:
        raise ValueError(f"{what}: no router vectors inside encoder/decoder blocks (keys like "
                         "encoder.block.0.layer.0.SelfAttention.q._addons.router.expert_embeddings__0).")
    return blocks


def _vector_size(vectors: dict) -> int:
    """The size of a module's router vectors {expert index: vector} (one size: `_block_routers` checks it)."""
    return next(iter(vectors.values())).shape[0]


def _block_width(block: str, members: list, what: str) -> int:
    """The block's input size (d_model): that of its SelfAttention.q router, else the size most routers share.

    In T5 the FFN's wo reads d_ff, so not every router of a block has the block's width.
    """
    for module, vectors in members:
        if module.endswith("SelfAttention.q"):
            return _vector_size(vectors)
    counts = {}
    for _, vectors in members:
        counts[_vector_size(vectors)] = counts.get(_vector_size(vectors), 0) + 1
    widths = [w for w, c in counts.items() if c == max(counts.values())]
    if len(widths) > 1:
        raise ValueError(f"{what}, {block}: no SelfAttention.q router and as many router vectors of size {widths[0]} as of "
                         f"{widths[1]}; cannot tell the block's input size.")
    return widths[0]


def _average_by_index(block: str, members: list, what: str) -> dict:
    """{index: mean vector} over the members (all must have the same experts)."""
    indices = sorted(members[0][1])
    for module, vectors in members:
        if sorted(vectors) != indices:
            raise ValueError(f"{what}, {block}: {module} has router vectors for experts {sorted(vectors)}, "
                             f"{members[0][0]} for {indices}.")
    return {i: _mean(vectors[i] for _, vectors in members) for i in indices}


def merge_into_blocks_state(state: dict) -> dict:
    """Replaces the per-linear router vectors of each block by their average at `<block>._addons.router.
    expert_embeddings__i`. Only vectors of the block's common size are averaged (in T5 the FFN's wo reads
    d_ff, not d_model); the others are deleted as well, since one block router serves the whole block."""
    out = dict(state)
    for block, members in _block_routers(state, "merge_into_blocks").items():
        width = _block_width(block, members, "merge_into_blocks")
        left_out = [m for m, v in members if _vector_size(v) != width]
        if left_out:
            print(f"[colm] merge_into_blocks: {block}: {len(left_out)} router(s) of another size not averaged, "
                  f"e.g. {left_out[0]}.")
        for module, vectors in members:
            for i in vectors:
                del out[K.router_key(module, i)]
        same_width = [(m, v) for m, v in members if _vector_size(v) == width]
        for i, mean in _average_by_index(block, same_width, "merge_into_blocks").items():
            out[K.router_key(block, i)] = mean
    return out


@gin.configurable
def merge_into_blocks(path=gin.REQUIRED, out_path=gin.REQUIRED):
    _refuse_in_place("merge_into_blocks", out_path, path)
    return save(merge_into_blocks_state(load(path)), out_path)


def make_router_blockwise_state(state: dict, index=None) -> dict:
    """Keeps every router key but overwrites each vector with the average of the same-size vectors of its block.

    index: only that expert's vectors (None: all).
    """
    out = dict(state)
    for block, members in _block_routers(state, "make_router_blockwise").items():
        for width in sorted({_vector_size(v) for _, v in members}):
            same_width = [(m, v) for m, v in members if _vector_size(v) == width]
            for i, mean in _average_by_index(block, same_width, "make_router_blockwise").items():
                if index is None or i == index:
                    for module, _ in same_width:
                        out[K.router_key(module, i)] = mean.clone()
    return out


@gin.configurable
def make_router_blockwise(path=gin.REQUIRED, out_path=None, index=None):
    """out_path=None: the path with "lora" replaced by "lora_block"."""
    if out_path is None:
        if "lora" not in path:
            raise ValueError(f"make_router_blockwise: path {path!r} contains no \"lora\" to derive the output "
                             "path from; bind make_router_blockwise.out_path.")
        out_path = path.replace("lora", "lora_block")
    return save(make_router_blockwise_state(load(path), index), out_path)


_ENCODER_BLOCK_KEY = re.compile(r"encoder\.block\.(\d+)\.")


def skip_blocks_state(state: dict, block_num: int) -> dict:
    """Deletes every key of encoder blocks 0..block_num (inclusive)."""
    if not isinstance(block_num, int) or isinstance(block_num, bool) or block_num < 0:
        raise ValueError(f"skip_blocks: block_num must be a non-negative integer, got {block_num!r}.")

    def in_skipped_block(key):
        match = _ENCODER_BLOCK_KEY.match(key)
        return match is not None and int(match.group(1)) <= block_num

    out = _without(state, in_skipped_block)
    if len(out) == len(state):
        print(f"[colm] skip_blocks: no keys in encoder blocks 0..{block_num}; nothing deleted.")
    return out


@gin.configurable
def skip_blocks(path=gin.REQUIRED, out_path=gin.REQUIRED, block_num=gin.REQUIRED):
    _refuse_in_place("skip_blocks", out_path, path)
    return save(skip_blocks_state(load(path), block_num), out_path)


def skip_alternate_state(state: dict, ffn_exp: bool) -> dict:
    """ffn_exp=True keeps only the FFN (DenseReluDense) keys, False drops them. Embedding keys always stay."""
    if not isinstance(ffn_exp, bool):
        raise ValueError(f"skip_alternate: ffn_exp must be True or False, got {ffn_exp!r}.")
    return {k: v for k, v in state.items() if K.is_embedding_key(k) or ((".DenseReluDense." in k) == ffn_exp)}


@gin.configurable
def skip_alternate(path=gin.REQUIRED, out_path=gin.REQUIRED, ffn_exp=gin.REQUIRED):
    _refuse_in_place("skip_alternate", out_path, path)
    return save(skip_alternate_state(load(path), ffn_exp), out_path)


# ----------------------------------------------------------------------------------------------------------
# Orthogonal router vectors (spec 4.9, svd_orth)


def nearest_orthonormal_rows(vectors: torch.Tensor) -> torch.Tensor:
    """Scale-preserving orthogonalisation of N x d rows (N <= d): rows are divided by their norms, replaced by
    the nearest orthonormal set U V^T (SVD), and multiplied by their norms again. Float64."""
    matrix = vectors.double()
    norms = matrix.norm(dim=1, keepdim=True)
    unit = matrix / norms.clamp_min(torch.finfo(torch.float64).tiny)
    u, _, vh = torch.linalg.svd(unit, full_matrices=False)
    return (u @ vh) * norms


def svd_orthogonalize_router_state(state: dict, skip_keys=()) -> dict:
    """Orthogonalises the N router vectors of every router (modules containing a skip_keys string are kept)."""
    skip = [skip_keys] if isinstance(skip_keys, str) else list(skip_keys)
    out = dict(state)
    done = 0
    for (module, param), vectors in K.group(state).items():
        if param != K.EMBEDDINGS or any(s in module for s in skip):
            continue
        indices = sorted(vectors)
        shapes = sorted({tuple(v.shape) for v in vectors.values()})
        if len(shapes) != 1 or len(shapes[0]) != 1:
            raise ValueError(f"svd_orthogonalize_router: router {module} has vectors of shapes {shapes}; all of a "
                             "router's vectors must be one-dimensional and of one size.")
        _refuse_non_finite(vectors.values(), f"svd_orthogonalize_router: router {module}")
        stacked = torch.stack([vectors[i] for i in indices])
        if stacked.shape[0] > stacked.shape[1]:
            raise ValueError(f"svd_orthogonalize_router: router {module} has {stacked.shape[0]} vectors of size "
                             f"{stacked.shape[1]}; at most as many vectors as dimensions can be orthogonal.")
        orthogonal = nearest_orthonormal_rows(stacked).to(stacked.dtype)
        for row, i in enumerate(indices):
            out[K.router_key(module, i)] = orthogonal[row].clone()
        done += 1
    if not done:
        raise ValueError("svd_orthogonalize_router: the checkpoint has no router vectors to orthogonalise.")
    return out


@gin.configurable
def svd_orthogonalize_router(path=gin.REQUIRED, out_path=gin.REQUIRED, skip_keys=()):
    _refuse_in_place("svd_orthogonalize_router", out_path, path)
    return save(svd_orthogonalize_router_state(load(path), skip_keys), out_path)


# ----------------------------------------------------------------------------------------------------------
# Merging experts (spec 4.8.2; design.md point 4)


def _merge_input(state: dict, what: str) -> dict:
    _refuse_unknown_keys(state, what)
    K.validate_experts(state, what)
    if not K.expert_count(state):
        raise ValueError(f"{what}: the checkpoint has no experts (no layer1__i keys).")
    return K.group(state)


def _zero_routers(groups: dict) -> dict:
    """Router vector 0 = zeros at every router module (one expert: its routing weight is always 1)."""
    return {K.router_key(module, 0): torch.zeros_like(vectors[0])
            for (module, param), vectors in groups.items() if param == K.EMBEDDINGS}


def average_lora_weights_state(state: dict) -> dict:
    """The ORIGINAL's merge: layer1__0 = mean_i layer1_i and layer2__0 = mean_i layer2_i, averaged separately.

    This is NOT the average of the experts' updates: mean(layer1) @ mean(layer2) != mean(layer1_i @ layer2_i)
    in general. Kept to reproduce the original; the exact merge is average_outer_product_lora_weights.
    """
    groups = _merge_input(state, "average_lora_weights")
    out = K.embedding_entries(state)
    for (module, param), experts in groups.items():
        if param in (K.LAYER1, K.LAYER2):
            out[K.IndexedKey(module, param, 0).key] = _mean(experts[i] for i in sorted(experts))
    out.update(_zero_routers(groups))
    return out


@gin.configurable
def average_lora_weights(path=gin.REQUIRED, out_path=gin.REQUIRED):
    _refuse_in_place("average_lora_weights", out_path, path)
    return save(average_lora_weights_state(load(path)), out_path)


def average_outer_product_lora_weights_state(state: dict) -> dict:
    """Exact Merged Experts: one expert whose update is the mean of the experts' updates dW_i = layer1_i layer2_i / r.

    layer1__0 = [layer1_0 | ... | layer1_{N-1}] (d_in x N*r) and layer2__0 = [layer2_0; ...; layer2_{N-1}] / N
    (N*r x d_out), so (x @ layer1 @ layer2) / r = x @ mean_i dW_i. The 1/N sits in layer2: evaluate the merged
    expert with the per-expert scale 1/r (r the experts' rank), not 1/(N*r). Router vector 0 = zeros.
    """
    groups = _merge_input(state, "average_outer_product_lora_weights")
    out = K.embedding_entries(state)
    for (module, param), ones in groups.items():
        if param != K.LAYER1:
            continue
        twos = groups[(module, K.LAYER2)]
        order = sorted(ones)
        out[K.layer1_key(module, 0)] = torch.cat([ones[i] for i in order], dim=1)
        layer2 = torch.cat([twos[i].float() for i in order], dim=0) / len(order)
        out[K.layer2_key(module, 0)] = layer2.to(twos[order[0]].dtype)
    out.update(_zero_routers(groups))
    return out


@gin.configurable
def average_outer_product_lora_weights(path=gin.REQUIRED, out_path=gin.REQUIRED):
    _refuse_in_place("average_outer_product_lora_weights", out_path, path)
    return save(average_outer_product_lora_weights_state(load(path)), out_path)


# ----------------------------------------------------------------------------------------------------------
# Retrieval checkpoint (spec 4.8.5 step 2)


def retrieval_library_file(embeddings_path: str, scope: str, dataset_length: int) -> str:
    """`<EXP_OUT>/<embeddings_path>/D_<scope with / -> _>_TRAIN_K<dataset_length>_embeddings.npy`."""
    name = f"D_{scope.replace('/', '_')}_TRAIN_K{dataset_length}_embeddings.npy"
    return os.path.join(EXP_OUT, expand(embeddings_path, "embeddings_path"), name)


def make_checkpoint_for_retrieval_state(state: dict, library: list) -> dict:
    """Deletes every router vector; expert i's library (n_i x e sentence embeddings) is zero-padded to the
    largest n and flattened into `encoder._addons.router.expert_embeddings__i` (n_max * e)."""
    n_experts = K.expert_count(state)
    if n_experts and len(library) != n_experts:
        raise ValueError(f"make_checkpoint_for_retrieval: {len(library)} expert libraries for a checkpoint with "
                         f"{n_experts} experts; the setting must list the checkpoint's experts in order.")
    for i, matrix in enumerate(library):
        if matrix.dim() != 2 or matrix.shape[1] != library[0].shape[1]:
            raise ValueError(f"make_checkpoint_for_retrieval: library {i} has shape {tuple(matrix.shape)}; expected "
                             f"(examples x {library[0].shape[1]}).")
    rows = max(m.shape[0] for m in library)
    out = _without(state, K.is_router_key)
    for i, matrix in enumerate(library):
        padded = torch.zeros(rows, matrix.shape[1], dtype=torch.float32)
        padded[: matrix.shape[0]] = matrix.float()
        out[K.router_key("encoder", i)] = padded.flatten()
    return out


@gin.configurable
def make_checkpoint_for_retrieval(checkpoint_path=gin.REQUIRED, embeddings_path=gin.REQUIRED, out_path=gin.REQUIRED,
                                  dataset_length=1000, dataset_dict_str="Full"):
    _refuse_in_place("make_checkpoint_for_retrieval", out_path, checkpoint_path)
    # Library files are named by scope; no dataset registry is loaded here, so the scopes of experts of your own
    # are not checked against one (a wrong one shows as a missing library file below).
    setting = get_setting(dataset_dict_str, check_scopes=False)
    files = {name: retrieval_library_file(embeddings_path, scope, dataset_length) for name, scope in setting.items()}
    missing = {name: f for name, f in files.items() if not os.path.isfile(f)}
    if missing:
        known = [name for name in missing if isinstance(dataset_dict_str, str) or is_listed(name)]
        settings = sorted({setting_containing(name) for name in known})
        if len(known) < len(missing):  # experts of your own: the library is made for the list, with their gin files
            settings.append("'" + json.dumps(list(dataset_dict_str)) + "' -extra_gin_files <your gin files>")
        commands = "; ".join(f"bash colm/experiments/bash_scripts/retriever.sh -make_expert_library True "
                             f"-dataset_setting {s} -dataset_length {dataset_length}" for s in settings)
        raise FileNotFoundError(f"make_checkpoint_for_retrieval: {len(missing)} library file(s) missing: "
                                f"{sorted(missing.values())}. Make them with: {commands}")
    state = load(checkpoint_path, "checkpoint_path")
    library = [torch.from_numpy(np.load(f, allow_pickle=False)) for f in files.values()]
    return save(make_checkpoint_for_retrieval_state(state, library), out_path)
