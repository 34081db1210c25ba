"""One router for the whole decoder stack (A1, spec 4.9): made from per-linear decoder routers, or taken
from another checkpoint."""

import gin

from colm.checkpoints.common import average, refuse_in_place, transform_file, without
from colm.formats import keys as K
from colm.formats.checkpoint_io import read_experiment, write_experiment
from colm.models import architecture as A


def _is_decoder_router(key: str) -> bool:
    parsed = K.parse_indexed(key)
    if parsed is None or not parsed.is_router:
        return False
    return A.stack_of(parsed.module) == A.DECODER


def make_one_router_decoder_state(state: dict, matching_strings=A.a1_router_sources()) -> dict:
    """Per expert, the mean of the router vectors of the decoder modules whose name contains one of
    matching_strings becomes `decoder._addons.router.expert_embeddings__i`; all other decoder routers go."""
    matching = [matching_strings] if isinstance(matching_strings, str) else list(matching_strings)
    matched = [
        (module, vectors) for (module, param), vectors in K.group(state).items()
        if param == K.EMBEDDINGS and A.stack_of(module) == A.DECODER and module != A.a1_router()
        and any(s in module for s in matching)
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
    out = without(state, _is_decoder_router)
    for i in indices:
        out[K.router_key(A.a1_router(), i)] = average(vectors[i] for _, vectors in matched)
    return out


@gin.configurable
def make_one_router_decoder(path=gin.REQUIRED, out_path=gin.REQUIRED,
                            matching_strings=A.a1_router_sources()):
    return transform_file("make_one_router_decoder", make_one_router_decoder_state, path, out_path, matching_strings)


def make_a_specific_checkpoint_state(state1: dict, state2: dict) -> dict:
    """state1 with its decoder router vectors replaced by those of state2."""
    decoder2 = {k: v for k, v in state2.items() if _is_decoder_router(k)}
    if not decoder2:
        raise ValueError("make_a_specific_checkpoint: the second checkpoint has no decoder router vectors.")
    out = without(state1, _is_decoder_router)
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
    refuse_in_place("make_a_specific_checkpoint", out_path, path1, path2)
    state = make_a_specific_checkpoint_state(read_experiment(path1, "path1"), read_experiment(path2, "path2"))
    return write_experiment(state, out_path)
