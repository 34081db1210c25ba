"""Saving and loading weights: the original's `.pt` layout (a flat {key: tensor} dict of the HF model's
state-dict keys), or safetensors when the path ends in `.safetensors`.

Writes are atomic (temporary file, then rename): an interrupted save never destroys an existing file.
Loads use `weights_only=True`. Unexpected keys and shape mismatches are refused with a message that names
them; missing keys are fine (a checkpoint holds only experts, gates and routers).
"""

import glob
import os
import re

import gin
import torch

from colm.utils.atomic import atomic_path
from colm.utils.paths import expand


def read_checkpoint(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Checkpoint {path} does not exist (each stage writes exp_out/<exp_name>/best.pt).")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt or truncated file, or a pickle that is not plain tensors
        raise RuntimeError(f"Could not read checkpoint {path}: {error}. Is the file complete?") from error
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RuntimeError(f"Checkpoint {path} is not a flat {{key: tensor}} dict.")
    return state


def write_checkpoint(state: dict, path: str) -> None:
    with atomic_path(path) as tmp:
        if path.endswith(".safetensors"):
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in state.items()}, tmp)
        else:
            torch.save(state, tmp)


def _next_free_index(path: str) -> str:
    stem, ext = os.path.splitext(path)
    used = [int(m.group(1)) for p in glob.glob(f"{stem}.*{ext}") if (m := re.search(r"\.(\d+)" + re.escape(ext) + "$", p))]
    return f"{stem}.{max(used, default=-1) + 1}{ext}"


@gin.configurable
def upload_to_gcs(local_path, bucket=None, prefix=""):
    """Copies a file to gs://<bucket>/<prefix><local_path>. Returns True on success, False (reported) on failure."""
    if not bucket:
        raise ValueError("should_save_to_gcp=True needs a bucket: bind upload_to_gcs.bucket = \"<your-bucket>\".")
    try:
        from google.cloud import storage

        blob = storage.Client().bucket(bucket).blob(prefix + local_path)
        blob.upload_from_filename(local_path)
        print(f"[colm] uploaded {local_path} to gs://{bucket}/{prefix}{local_path}")
        return True
    except Exception as error:
        print(f"[colm] WARNING: upload of {local_path} to gs://{bucket} failed: {error}. The local file is kept.")
        return False


@gin.configurable
def save_weights(model, weight_path=gin.REQUIRED, add_index=False, add_global_step=False,
                 ignore_frozen_parameters=False, should_save_to_gcp=False, save_params=None):
    path = expand(weight_path, "save_weights.weight_path")
    if add_global_step:
        stem, ext = os.path.splitext(path)
        path = f"{stem}.{model.global_step}{ext}"
    elif add_index:
        path = _next_free_index(path)
    state = model.torch_model.state_dict()
    if save_params is not None:
        regex = re.compile(model.to_regex(save_params))
        state = {k: v for k, v in state.items() if regex.fullmatch(k)}
    if ignore_frozen_parameters:
        trainable = {name for name, p in model.torch_model.named_parameters() if p.requires_grad}
        state = {k: v for k, v in state.items() if k in trainable}
    state = {k: v.detach().cpu() for k, v in state.items()}
    write_checkpoint(state, path)
    print(f"[colm] saved {len(state)} tensors to {path}")
    if should_save_to_gcp:
        upload_to_gcs(path)
    return path


def _latest_numbered(path: str) -> str:
    stem, ext = os.path.splitext(path)
    found = [(int(m.group(1)), p) for p in glob.glob(f"{stem}.*{ext}") if (m := re.search(r"\.(\d+)" + re.escape(ext) + "$", p))]
    if not found:
        raise FileNotFoundError(f"No numbered checkpoint {stem}.<N>{ext} found.")
    return max(found)[1]


def load_state_into(model, state: dict, source: str) -> None:
    """Loads a flat state dict into model.torch_model, creating experts the checkpoint defines."""
    model.prepare_load(state)
    own = model.torch_model.state_dict()
    unexpected = [k for k in state if k not in own]
    if unexpected:
        raise KeyError(
            f"{source} has {len(unexpected)} key(s) this model does not have, e.g. {unexpected[:3]}. "
            "The checkpoint was made for another architecture or stage: check the model gin files "
            "(e.g. moe_lora_rank16.gin for LoRALinear checkpoints vs the MoE gins for put_index_to_lora ones)."
        )
    wrong = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items() if v.shape != own[k].shape]
    if wrong:
        key, got, want = wrong[0]
        raise ValueError(
            f"{source}: {len(wrong)} tensor(s) have the wrong shape, e.g. {key}: checkpoint {got}, model {want}. "
            "The checkpoint comes from a different model size or LoRA rank."
        )
    model.torch_model.load_state_dict(state, strict=False)
    model.after_load()


@gin.configurable
def load_weights(model, weight_path=gin.REQUIRED, scan_numbers=False, skip_if_not_found=False):
    path = expand(weight_path, "load_weights.weight_path")
    if scan_numbers:
        path = _latest_numbered(path)
    if not os.path.isfile(path) and skip_if_not_found:
        print(f"[colm] load_weights: {path} not found, skipped (skip_if_not_found=True).")
        return
    state = read_checkpoint(path)
    load_state_into(model, state, path)
    print(f"[colm] loaded {len(state)} tensors from {path}")
