"""Experts of a checkpoint: the plain LoRA -> MoE format conversion (spec 4.3), appending the experts of a
second checkpoint, and rescaling expert weights."""

import gin
import torch

from colm.checkpoints.common import refuse_in_place, transform_file
from colm.formats import keys as K
from colm.formats.checkpoint_io import read_experiment, write_experiment


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
    return transform_file("put_index_to_lora", put_index_to_lora_state, path, out_path)


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
    refuse_in_place("concatenate_two_checkpoints", out_path, path1, path2)
    state = concatenate_two_checkpoints_state(read_experiment(path1, "path1"), read_experiment(path2, "path2"), index)
    return write_experiment(state, out_path)


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
    refuse_in_place("normalize_expert_weights", out_path, path)
    state = normalize_expert_weights_state(read_experiment(path), index, norm_value, keys_to_ignore)
    return write_experiment(state, out_path)
