"""Router vectors computed from the expert weights (spec 4.8.4; Arrow routing)."""

import gin
import torch

from colm.checkpoints.common import refuse_non_finite, transform_file, without
from colm.formats import keys as K

ROUTER_METHODS = ("simple", "eigen_weighted_vector", "top1_eigen_weighted_vector")


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
            refuse_non_finite([value], f"create_router_embeddings_from_weights: {key}")
    groups = K.group(state)
    out = without(state, K.is_router_key)
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
    return transform_file("create_router_embeddings_from_weights", create_router_embeddings_from_weights_state, path, out_path, method_type)
