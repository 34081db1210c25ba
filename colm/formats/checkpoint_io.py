"""Reading and writing checkpoint files: the original's `.pt` layout (a flat {key: tensor} dict of the HF
model's state-dict keys), or safetensors when the path ends in `.safetensors`.

Writes are atomic (temporary file, then rename): an interrupted save never destroys an existing file.
Reads use `weights_only=True` and never fall back to unpickling code. Errors name the file and the fix.

read_checkpoint / write_checkpoint take a file; read_experiment / write_experiment take an experiment path
relative to exp_out/ (layout.checkpoint_file), as the checkpoint scripts do.
"""

import glob
import os
import re

import torch

from colm.formats import layout
from colm.utils.atomic import atomic_path
from colm.utils.run_dir import unfinished_warning


def read_checkpoint(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Checkpoint {path} does not exist (each stage writes "
                                f"{layout.EXP_OUT}/<exp_name>/{layout.BEST_CHECKPOINT}).")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt or truncated file, or a pickle that is not plain tensors
        raise RuntimeError(_unreadable_message(path, error)) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RuntimeError(f"Checkpoint {path} is not a flat {{key: tensor}} dict.")
    return state


def _unreadable_message(path: str, error: Exception) -> str:
    """Why a checkpoint could not be read, without torch's advice to retry with weights_only=False (which
    would run whatever code a crafted file carries)."""
    size = os.path.getsize(path)
    text = str(error)
    if "weights_only" in text or "Unsupported global" in text or "Unpickl" in type(error).__name__:
        return (f"Checkpoint {path} holds Python objects other than tensors; colm loads only plain "
                "{key: tensor} files and never runs code from a checkpoint. Re-create it with colm "
                "(save_weights or the checkpoint scripts), or convert it to safetensors in a trusted environment.")
    first_line = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return (f"Could not read checkpoint {path} ({size} bytes): {first_line}. The file is truncated or corrupt "
            "(e.g. a copy or a save that was interrupted): copy it again or re-run the stage that writes it.")


def write_checkpoint(state: dict, path: str) -> None:
    with atomic_path(path) as tmp:
        if path.endswith(".safetensors"):
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in state.items()}, tmp)
        else:
            torch.save(state, tmp)


def read_experiment(path: str, what: str = "path") -> dict:
    """The checkpoint of experiment `path` (exp_out/<path>/best.pt); warns when its training run is unfinished."""
    file = layout.checkpoint_file(path, what)
    warning = unfinished_warning(file)
    if warning:
        print(warning)
    return read_checkpoint(file)


def write_experiment(state: dict, out_path: str, what: str = "out_path") -> str:
    """Writes exp_out/<out_path>/best.pt atomically; returns the file."""
    file = layout.checkpoint_file(out_path, what)
    write_checkpoint(state, file)
    print(f"[colm] wrote {len(state)} tensors to {file}")
    return file


def numbered_files(path: str) -> dict:
    """{number: file} of the existing `<stem>.<number><ext>` files of `path` (layout.numbered_file)."""
    stem, ext = os.path.splitext(path)
    pattern = re.compile(r"\.(\d+)" + re.escape(ext) + "$")
    return {int(m.group(1)): p for p in glob.glob(f"{glob.escape(stem)}.*{ext}") if (m := pattern.search(p))}
