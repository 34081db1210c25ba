"""The moma calls that save a model's weights to a checkpoint and load them into a model (save_weights,
load_weights); the files themselves are read and written by colm/formats/checkpoint_io.py, so
`weight_path` may also be a `gs://<bucket>/<object>` path (read from / written to GCS).

Loading refuses, with a message that names them: unexpected keys, shape mismatches, NaN / Inf values
(naming the module), an empty checkpoint, and expert tensors the model expects but the file lacks when
nothing else would set them (a frozen model: the evaluation would run them at their initial values).
Missing expert tensors that training will set are reported with their count. The frozen base model's own
weights are never expected: a checkpoint holds only experts, gates and routers.

Memory: load_weights maps a `.pt` checkpoint (read_checkpoint(mmap=True)) and copies each tensor straight into the
model tensor its key names (a per-expert key into its row of the stacked expert parameters), in the file's order,
releasing the file's pages behind (checkpoint_io.in_file_order). So loading N experts holds the model and about
one tensor of the checkpoint, not the whole checkpoint beside the experts, and no stacked copies
(benchmarks/loading_memory.py).
"""

import itertools
import os
import re

import gin
import torch

from colm.formats import gcs
from colm.formats import keys as K
from colm.formats.checkpoint_io import in_file_order, numbered_files, read_checkpoint, write_checkpoint
from colm.formats.layout import numbered_file
from colm.utils import distributed
from colm.utils.paths import expand


def _next_free_numbered(path: str) -> str:
    used = numbered_files(path)
    return numbered_file(path, max(used, default=-1) + 1)


@gin.configurable
def upload_to_gcs(local_path, bucket=None, prefix=""):
    """Copies a file to gs://<bucket>/<prefix><local_path> (a leading "/" of local_path dropped).

    Returns the gs:// path on success; on failure prints a warning naming the bucket, the object and what to do
    (colm/formats/gcs.py) and returns None: the local file is kept and the run goes on."""
    if not bucket:
        raise ValueError("should_save_to_gcp=True needs a bucket: bind upload_to_gcs.bucket = \"<your-bucket>\".")
    if bucket.startswith(gcs.SCHEME) or "/" in bucket:
        raise ValueError(f"upload_to_gcs.bucket={bucket!r}: give the bucket name alone (e.g. \"my-bucket\"); put a "
                         "folder in upload_to_gcs.prefix (e.g. \"runs/\").")
    target = f"{gcs.SCHEME}{bucket}/{prefix}{local_path.lstrip('/')}"
    try:
        gcs.upload_file(local_path, target)
    except (gcs.GcsError, OSError, ValueError) as error:
        print(f"[colm] WARNING: upload of {local_path} failed. {error} The local file is kept.")
        return None
    print(f"[colm] uploaded {local_path} to {target}")
    return target


@gin.configurable
def save_weights(model, weight_path=gin.REQUIRED, add_index=False, add_global_step=False,
                 ignore_frozen_parameters=False, should_save_to_gcp=False, save_params=None):
    path = expand(weight_path, "save_weights.weight_path")
    if add_global_step:
        path = numbered_file(path, model.global_step)
    elif add_index:
        path = _next_free_numbered(path)
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
        if gcs.is_gcs_path(path):
            print(f"[colm] save_weights: {path} is on GCS already; should_save_to_gcp uploads nothing more.")
        else:
            upload_to_gcs(path)
    return path


def _latest_numbered(path: str) -> str:
    found = numbered_files(path)
    if not found:
        raise FileNotFoundError(f"No numbered checkpoint {numbered_file(path, '<N>')} found.")
    return found[max(found)]


def _module_of(key: str) -> str:
    parsed = K.parse_indexed(key) or K.parse_lora(key) or K.parse_gate(key)
    if parsed is None:
        return key.rsplit(".", 1)[0]
    return parsed.module if isinstance(parsed, K.IndexedKey) else parsed[0]


def check_finite(state: dict, source: str) -> None:
    """Refuses NaN / Inf values, naming the tensor and its module."""
    for key, value in in_file_order(state):
        if (value.is_floating_point() or value.is_complex()) and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            if bad:
                raise ValueError(
                    f"{source}: {key} (module {_module_of(key)}) holds {bad} NaN/Inf value(s) of {value.numel()}; "
                    "the run that wrote it diverged. Use an earlier checkpoint (weights.<step>.pt, or the run's "
                    "best.pt) or retrain with a lower learning rate.")


def _is_expert_tensor(key: str) -> bool:
    """Keys of the tensors colm checkpoints carry: experts, routers, gates, plain LoRA factors."""
    return K.parse_indexed(key) is not None or K.parse_lora(key) is not None or K.is_gate_key(key)


def _trainable_pattern(model):
    pattern = getattr(model, "trainable_params", None)
    if pattern is None:  # during Model.__init__ (init moma calls) the flags are set afterwards
        pattern = getattr(model, "requested_trainable_params", None)
    if pattern is None or not hasattr(model, "to_regex"):
        return None
    return re.compile(model.to_regex(pattern))


def check_missing(model, own: dict, state: dict, source: str) -> list:
    """The expert tensors the model has but `state` lacks. Refused when the model will not train them (nothing
    else would set them: they would run at their initial values); reported with their count otherwise."""
    expected = [k for k in own if _is_expert_tensor(k)]
    missing = [k for k in expected if k not in state]
    if not missing:
        return []
    regex = _trainable_pattern(model)

    def trained(key):
        return regex is not None and (regex.fullmatch(key) or regex.fullmatch(re.sub(r"__\d+$", "", key)))

    frozen = [k for k in missing if not trained(k)]
    if frozen:
        raise KeyError(
            f"{source} lacks {len(frozen)} of the {len(expected)} expert tensors this model expects, e.g. {frozen[:3]}, "
            "and nothing else sets them (they are not trained here): the model would run them at their initial "
            "values. The file is incomplete, or it comes from another stage (e.g. a LoRA checkpoint before "
            "put_index_to_lora, or a checkpoint without gates for FFNExperts.use_input_gate).")
    print(f"[colm] {source}: {len(missing)} of the {len(expected)} expert tensors this model expects are not in it "
          f"(e.g. {missing[0]}); they start from their initial values and are trained.")
    return missing


def load_state_into(model, state: dict, source: str) -> None:
    """Loads a flat state dict into model.torch_model, creating experts the checkpoint defines."""
    if not state:
        raise ValueError(f"{source} holds no tensors (an empty checkpoint): the model would run without its experts. "
                         "Re-run the stage that writes it.")
    check_finite(state, source)
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
    check_missing(model, own, state, source)
    _copy_into(model.torch_model, own, state)
    model.after_load()


def _copy_into(torch_model, own: dict, state: dict) -> None:
    """Sets the model's tensors to the checkpoint's, as load_state_dict(state, strict=False) does (the per-expert
    keys of a stacked expert parameter included), without building stacked copies: `own` is the model's state dict,
    whose entries are the model's tensors or views of them (ExtendableAddon._split_experts: one row of the stacked
    parameter per expert), and each checkpoint tensor is copied into its entry, in the file's order
    (in_file_order). Keys whose entry is not the memory of a model tensor go through load_state_dict."""
    storages = {t.untyped_storage().data_ptr() for t in itertools.chain(torch_model.parameters(), torch_model.buffers())}
    direct = {k for k in state if own[k].numel() and own[k].untyped_storage().data_ptr() in storages}
    with torch.no_grad():
        for key, value in in_file_order(state):
            if key in direct:
                own[key].copy_(value)
    rest = {k: v for k, v in state.items() if k not in direct}
    if rest:
        torch_model.load_state_dict(rest, strict=False)


@gin.configurable
def load_weights(model, weight_path=gin.REQUIRED, scan_numbers=False, skip_if_not_found=False):
    path = expand(weight_path, "load_weights.weight_path")
    if scan_numbers:
        path = _latest_numbered(path)
    if skip_if_not_found and not (gcs.exists(path) if gcs.is_gcs_path(path) else os.path.isfile(path)):
        print(f"[colm] load_weights: {path} not found, skipped (skip_if_not_found=True).")
        return
    state = read_checkpoint(path, mmap=True)
    load_state_into(model, state, path)
    # Trainer.output_dir refuses to write a warm start into the directory of the checkpoint it started from.
    model.loaded_from = [*getattr(model, "loaded_from", []), path]
    if distributed.is_main():  # under torchrun every rank loads, one says so
        print(f"[colm] loaded {len(state)} tensors from {path}")
