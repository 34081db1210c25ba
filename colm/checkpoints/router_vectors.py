"""Router vectors of a checkpoint: zero ones created, deleted, summed over checkpoints, orthogonalised
(spec 4.9, svd_orth)."""

import re

import gin
import torch

from colm.checkpoints.common import delete_keys, refuse_in_place, refuse_non_finite, transform_file, without
from colm.formats import keys as K
from colm.formats.checkpoint_io import read_experiment, write_experiment
from colm.models.module_names import to_regex


def create_router_embeddings_state(state: dict, regex_pattern_list) -> dict:
    """Deletes every router vector, then adds a zero one per expert at each module that has experts and
    full-matches one of the patterns (module-name shortcuts such as "encoder_linear", or raw regexes)."""
    patterns = [regex_pattern_list] if isinstance(regex_pattern_list, str) else list(regex_pattern_list)
    if not patterns:
        raise ValueError("create_router_embeddings: regex_pattern_list is empty; e.g. [\"encoder_linear\", "
                         "\"decoder_linear\"].")
    regex = re.compile(to_regex(patterns))
    out = without(state, K.is_router_key)
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
    return write_experiment(create_router_embeddings_state(read_experiment(path), regex_pattern_list), out_path or path)


def delete_router_embeddings_state(state: dict) -> dict:
    return delete_keys(state, K.is_router_key, "delete_router_embeddings", "router vectors")


@gin.configurable
def delete_router_embeddings(path=gin.REQUIRED, out_path=None):
    return write_experiment(delete_router_embeddings_state(read_experiment(path)), out_path or path)


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
    refuse_in_place("add_router_embeddings", out_path, *(list_of_paths if isinstance(list_of_paths, (list, tuple))
                                                         else [list_of_paths]))
    states = [read_experiment(p, "list_of_paths") for p in list_of_paths]
    return write_experiment(add_router_embeddings_state(states), out_path)


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
        refuse_non_finite(vectors.values(), f"svd_orthogonalize_router: router {module}")
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
    return transform_file("svd_orthogonalize_router", svd_orthogonalize_router_state, path, out_path, skip_keys)
