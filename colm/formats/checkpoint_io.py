"""Reading and writing checkpoint files: the original's `.pt` layout (a flat {key: tensor} dict of the HF
model's state-dict keys), or safetensors when the path ends in `.safetensors`.

Writes are atomic (temporary file, then rename): an interrupted save never destroys an existing file.
Reads use `weights_only=True` and never fall back to unpickling code. Errors name the file and the fix.

read_checkpoint / write_checkpoint take a file; read_experiment / write_experiment take an experiment path
relative to exp_out/ (layout.checkpoint_file), as the checkpoint scripts do.

Every one of them also takes a `gs://<bucket>/<object>` path (colm/formats/gcs.py): a read downloads to a
temporary file, a write saves to a temporary file and uploads it to the final name once complete. A gs://
experiment path names the experiment directory itself: `gs://bucket/prefix/<exp>` -> `.../<exp>/best.pt`.
"""

import glob
import os
import re
import tempfile

import torch

from colm.formats import gcs, layout
from colm.utils.atomic import atomic_path
from colm.utils.run_dir import unfinished_warning


def read_checkpoint(path: str) -> dict:
    if gcs.is_gcs_path(path):
        with gcs.downloaded(path) as local:  # GcsNotFoundError (a FileNotFoundError) names bucket and object
            return _read_file(local, path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Checkpoint {path} does not exist (each stage writes "
                                f"{layout.EXP_OUT}/<exp_name>/{layout.BEST_CHECKPOINT}).")
    return _read_file(path, path)


def _read_file(file: str, path: str) -> dict:
    """Reads the local `file`; messages name `path` (the gs:// path a download came from, else `file`)."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(file)
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt or truncated file, or a pickle that is not plain tensors
        raise RuntimeError(_unreadable_message(path, error, file)) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RuntimeError(f"Checkpoint {path} is not a flat {{key: tensor}} dict.")
    return state


def _unreadable_message(path: str, error: Exception, file: str = None) -> str:
    """Why a checkpoint could not be read, without torch's advice to retry with weights_only=False (which
    would run whatever code a crafted file carries). `file` is the local copy of a gs:// `path`."""
    size = os.path.getsize(file or path)
    text = str(error)
    if "weights_only" in text or "Unsupported global" in text or "Unpickl" in type(error).__name__:
        return (f"Checkpoint {path} holds Python objects other than tensors; colm loads only plain "
                "{key: tensor} files and never runs code from a checkpoint. Re-create it with colm "
                "(save_weights or the checkpoint scripts), or convert it to safetensors in a trusted environment.")
    first_line = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return (f"Could not read checkpoint {path} ({size} bytes): {first_line}. The file is truncated or corrupt "
            "(e.g. a copy or a save that was interrupted): copy it again or re-run the stage that writes it.")


def write_checkpoint(state: dict, path: str) -> None:
    if gcs.is_gcs_path(path):  # GCS objects appear only once their upload is complete: atomic as well
        with tempfile.TemporaryDirectory(prefix="colm-gcs-") as directory:
            local = os.path.join(directory, os.path.basename(gcs.split(path)[1]))
            _write_file(state, local, path)
            gcs.upload_file(local, path)
        return
    with atomic_path(path) as tmp:
        _write_file(state, tmp, path)


def _write_file(state: dict, file: str, path: str) -> None:
    """Writes `state` to the local `file` in the format `path`'s extension names."""
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, file)
    else:
        torch.save(state, file)


def experiment_file(path: str, what: str = "path") -> str:
    """exp_out/<path>/best.pt (layout.checkpoint_file), or `<path>/best.pt` for a gs:// experiment path."""
    if gcs.is_gcs_path(path):
        gcs.split(path, need_object=False)
        if path.endswith((".pt", ".safetensors")):
            raise ValueError(f"{what}={path!r}: give the experiment directory, without {layout.BEST_CHECKPOINT} "
                             f"(e.g. gs://<bucket>/<prefix>/<exp_name> for .../<exp_name>/{layout.BEST_CHECKPOINT}).")
        return gcs.join(path, layout.BEST_CHECKPOINT)
    return layout.checkpoint_file(path, what)


def checkpoint_exists(path: str) -> bool:
    """Whether a checkpoint file (local, or gs://) is there."""
    return gcs.exists(path) if gcs.is_gcs_path(path) else os.path.isfile(path)


def read_experiment(path: str, what: str = "path") -> dict:
    """The checkpoint of experiment `path` (exp_out/<path>/best.pt, or gs://.../<path>/best.pt); warns when its
    (local) training run is unfinished."""
    file = experiment_file(path, what)
    warning = None if gcs.is_gcs_path(file) else unfinished_warning(file)
    if warning:
        print(warning)
    return read_checkpoint(file)


def write_experiment(state: dict, out_path: str, what: str = "out_path") -> str:
    """Writes exp_out/<out_path>/best.pt atomically (or gs://.../<out_path>/best.pt); returns the file."""
    file = experiment_file(out_path, what)
    write_checkpoint(state, file)
    print(f"[colm] wrote {len(state)} tensors to {file}")
    return file


def numbered_files(path: str) -> dict:
    """{number: file} of the existing `<stem>.<number><ext>` files of `path` (layout.numbered_file), local or gs://."""
    stem, ext = os.path.splitext(path)
    pattern = re.compile(re.escape(stem) + r"\.(\d+)" + re.escape(ext) + "$")
    found = gcs.list_paths(stem + ".") if gcs.is_gcs_path(path) else glob.glob(f"{glob.escape(stem)}.*{ext}")
    return {int(m.group(1)): p for p in found if (m := pattern.search(p))}
