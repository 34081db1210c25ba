"""PHATGOOSE gates (spec 4.5, 4.7): a trained gate becomes the expert's router vector, or is removed."""

import gin
import torch

from colm.checkpoints.common import delete_keys, transform_file
from colm.formats import keys as K
from colm.formats.checkpoint_io import read_experiment, write_experiment


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
    return write_experiment(use_input_gate_as_router_state(read_experiment(path)), path, "path")


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
    return transform_file("use_input_gate_in_router_and_expert", use_input_gate_in_router_and_expert_state, path, out_path)


def delete_expert_input_gate_state(state: dict) -> dict:
    return delete_keys(state, K.is_input_gate_key, "delete_expert_input_gate", "expert_input_gate keys")


@gin.configurable
def delete_expert_input_gate(path=gin.REQUIRED, out_path=None):
    """out_path=None: in place."""
    return write_experiment(delete_expert_input_gate_state(read_experiment(path)), out_path or path)
