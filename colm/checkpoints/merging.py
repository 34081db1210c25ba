"""Merged Experts (spec 4.8.2; design.md point 4): all experts of a checkpoint merged into one.

Conventions: layer1_i is d_in x r, layer2_i is r x d_out, and expert i adds (x @ layer1_i @ layer2_i) / r,
so its dense update is dW_i = layer1_i @ layer2_i / r (d_in x d_out, applied as x @ dW_i).
"""

import gin
import torch

from colm.checkpoints.common import average, refuse_unknown_keys, transform_file
from colm.formats import keys as K


def _merge_input(state: dict, what: str) -> dict:
    refuse_unknown_keys(state, what)
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
            out[K.IndexedKey(module, param, 0).key] = average(experts[i] for i in sorted(experts))
    out.update(_zero_routers(groups))
    return out


@gin.configurable
def average_lora_weights(path=gin.REQUIRED, out_path=gin.REQUIRED):
    return transform_file("average_lora_weights", average_lora_weights_state, path, out_path)


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
    return transform_file("average_outer_product_lora_weights", average_outer_product_lora_weights_state, path, out_path)
