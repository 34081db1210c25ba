"""Steps shared by the checkpoint surgery modules: refusing bad input before anything is written, and small
operations on flat {key: tensor} dicts."""

import os

import torch

from colm.formats import keys as K
from colm.formats.checkpoint_io import read_experiment, write_experiment
from colm.formats.layout import CONCATENATED_DIR, checkpoint_file


def refuse_in_place(function: str, out_path, *inputs) -> None:
    """A function with an output of its own refuses to write over one of its inputs (put_index_to_lora with
    out_path == path overwrote the stage-1 LoRA it read)."""
    out = checkpoint_file(out_path, f"{function}.out_path")
    for source in inputs:
        if isinstance(source, str) and os.path.normpath(checkpoint_file(source, function)) == os.path.normpath(out):
            raise ValueError(f"{function}: out_path={out_path!r} is its input {source!r}; writing there would replace "
                             "the input checkpoint. Give the result its own out_path "
                             f"(e.g. under {CONCATENATED_DIR}/).")


def transform_file(function: str, transform, path, out_path, *args) -> str:
    """The file form of a `<function>_state` transform: reads exp_out/<path>, writes transform(state, *args) to
    exp_out/<out_path> (never over its input) and returns the written file."""
    refuse_in_place(function, out_path, path)
    return write_experiment(transform(read_experiment(path), *args), out_path)


def refuse_unknown_keys(state: dict, what: str) -> None:
    """Merges need a pure expert checkpoint: only expert/router keys and the embedding keys."""
    unknown = [k for k in state if K.parse_indexed(k) is None and not K.is_embedding_key(k)]
    if unknown:
        raise ValueError(
            f"{what}: unexpected key(s) {unknown[:3]}{' ...' if len(unknown) > 3 else ''}; expected only expert "
            "(layer1/layer2), router (expert_embeddings) and embed_tokens keys. Remove gates first "
            "(delete_expert_input_gate)."
        )


def refuse_non_finite(tensors, what: str) -> None:
    """Decompositions (QR, SVD) fail on NaN / Inf with a LinAlgError that names nothing: refuse them first."""
    for tensor in tensors:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{what} holds NaN or Inf values; the run that wrote it diverged. Use an earlier "
                             "checkpoint of that expert.")


def without(state: dict, drop) -> dict:
    """A copy of state without the keys for which drop(key) is true (order kept)."""
    return {k: v for k, v in state.items() if not drop(k)}


def delete_keys(state: dict, is_deleted, function: str, what: str) -> dict:
    """`without`, saying so when nothing matched (`what` names the keys, e.g. "router vectors")."""
    out = without(state, is_deleted)
    if len(out) == len(state):
        print(f"[colm] {function}: the checkpoint has no {what}; nothing deleted.")
    return out


def average(tensors) -> torch.Tensor:
    """Mean in float32 (checkpoints are often bf16), returned in the first tensor's dtype."""
    tensors = list(tensors)
    return torch.stack([t.float() for t in tensors]).mean(dim=0).to(tensors[0].dtype)
