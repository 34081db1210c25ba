"""The retrieval baseline's checkpoint (spec 4.8.5 step 2): expert libraries of sentence embeddings packed
into router vectors."""

import json
import os

import gin
import numpy as np
import torch

from colm.checkpoints.common import refuse_in_place, without
from colm.datasets.settings import get_setting, is_listed, setting_containing
from colm.formats import keys as K
from colm.formats.checkpoint_io import read_experiment, write_experiment
from colm.formats.layout import retrieval_library_file
from colm.models import architecture as A


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
    out = without(state, K.is_router_key)
    for i, matrix in enumerate(library):
        padded = torch.zeros(rows, matrix.shape[1], dtype=torch.float32)
        padded[: matrix.shape[0]] = matrix.float()
        out[K.router_key(A.ENCODER, i)] = padded.flatten()
    return out


@gin.configurable
def make_checkpoint_for_retrieval(checkpoint_path=gin.REQUIRED, embeddings_path=gin.REQUIRED, out_path=gin.REQUIRED,
                                  dataset_length=1000, dataset_dict_str="Full"):
    refuse_in_place("make_checkpoint_for_retrieval", out_path, checkpoint_path)
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
    state = read_experiment(checkpoint_path, "checkpoint_path")
    library = [torch.from_numpy(np.load(f, allow_pickle=False)) for f in files.values()]
    return write_experiment(make_checkpoint_for_retrieval_state(state, library), out_path)
