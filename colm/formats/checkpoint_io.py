"""Reading and writing checkpoint files: the original's `.pt` layout (a flat {key: tensor} dict of the HF
model's state-dict keys), or safetensors when the path ends in `.safetensors`.

Writes are atomic (temporary file, then rename): an interrupted save never destroys an existing file.
Reads use `weights_only=True` and never fall back to unpickling code. Errors name the file and the fix.

read_checkpoint / write_checkpoint take a file; read_experiment / write_experiment take an experiment path
relative to exp_out/ (layout.checkpoint_file), as the checkpoint scripts do.

Every one of them also takes a `gs://<bucket>/<object>` path (colm/formats/gcs.py): a read downloads to a
temporary file, a write saves to a temporary file and uploads it to the final name once complete. A gs://
experiment path names the experiment directory itself: `gs://bucket/prefix/<exp>` -> `.../<exp>/best.pt`.

read_checkpoint(path, mmap=True) maps a `.pt` file instead of reading it (a MappedCheckpoint): nothing is copied,
a tensor's pages come from the file (or the page cache) when first read, and `in_file_order` walks the tensors in
the file's order handing the pages behind it back to the kernel, so that loading a checkpoint much larger than the
model's own tensors never holds all of it resident (colm/moma/weights.py load_weights; benchmarks/loading_memory.py).
"""

import ctypes
import glob
import mmap as mmap_module
import os
import re
import sys
import tempfile

import torch

from colm.formats import gcs, layout
from colm.utils.atomic import atomic_path
from colm.utils.run_dir import unfinished_warning


def read_checkpoint(path: str, mmap: bool = False) -> dict:
    """The flat {key: tensor} dict of a checkpoint file. mmap=True: for a `.pt` file in torch's zip format (what
    torch.save writes), a MappedCheckpoint whose tensors are views of a private mapping of the file (a write to one
    stays in this process); other files are read whole, as with mmap=False."""
    if gcs.is_gcs_path(path):
        # GcsNotFoundError (a FileNotFoundError) names bucket and object. A mapping outlives the temporary file.
        with gcs.downloaded(path) as local:
            return _read_file(local, path, mmap)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Checkpoint {path} does not exist (each stage writes "
                                f"{layout.EXP_OUT}/<exp_name>/{layout.BEST_CHECKPOINT}).")
    return _read_file(path, path, mmap)


def _read_file(file: str, path: str, mmap: bool = False) -> dict:
    """Reads the local `file`; messages name `path` (the gs:// path a download came from, else `file`)."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(file)
        state, mapped = _torch_load(file, mmap)
    except Exception as error:  # corrupt or truncated file, or a pickle that is not plain tensors
        raise RuntimeError(_unreadable_message(path, error, file)) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RuntimeError(f"Checkpoint {path} is not a flat {{key: tensor}} dict.")
    return MappedCheckpoint(state, os.stat(file).st_ino) if mapped else state


def _torch_load(file: str, mmap: bool):
    """(what torch.load returns, whether it is mapped)."""
    if mmap:
        try:
            return torch.load(file, map_location="cpu", weights_only=True, mmap=True), True
        except RuntimeError as error:
            if "mmap can only be used" not in str(error):
                raise
            # torch's legacy (pre-zip) format cannot be mapped: read it whole
    return torch.load(file, map_location="cpu", weights_only=True), False


_PAGE = mmap_module.PAGESIZE


def _storage_span(tensor):
    """(first byte, end) of the memory of a tensor's whole storage."""
    storage = tensor.untyped_storage()
    return storage.data_ptr(), storage.data_ptr() + storage.nbytes()


def _file_mapping(address, inode):
    """(start, end) of this process's mapping that holds `address`, if it maps the file with `inode`; else None."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split()
                start, end = (int(x, 16) for x in fields[0].split("-"))
                if start <= address < end:
                    return (start, end) if len(fields) >= 5 and int(fields[4]) == inode else None
    except (OSError, ValueError, IndexError):
        pass
    return None


def _page_releaser():
    """release(address, length) dropping pages of a private file mapping from this process (madvise MADV_DONTNEED;
    read again, they come back from the file); None where that is not available."""
    if not sys.platform.startswith("linux") or not hasattr(mmap_module, "MADV_DONTNEED"):
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return lambda address, length: madvise(address, length, mmap_module.MADV_DONTNEED)


class MappedCheckpoint(dict):
    """A checkpoint read with read_checkpoint(mmap=True): a flat {key: tensor} dict whose tensors (all of them as
    read) are views of one private mapping of the file; it keeps the mapping alive as long as it exists.
    `span` is the mapping's address range, found in /proc/self/maps by the file's inode (None where it cannot be
    confirmed: in_file_order then releases nothing)."""

    def __init__(self, state, inode):
        super().__init__(state)
        spans = [_storage_span(v) for v in state.values() if v.untyped_storage().nbytes() > 0]
        self.span = None
        if spans:
            mapping = _file_mapping(min(s[0] for s in spans), inode)
            if mapping is not None and all(mapping[0] <= a and b <= mapping[1] for a, b in spans):
                self.span = mapping
                # One storage of the mapping: while it is alive, no other memory can take the mapping's addresses.
                self._anchor = next(v.untyped_storage() for v in state.values() if v.untyped_storage().nbytes() > 0)

    def mapped(self, tensor) -> bool:
        """Whether `tensor`'s memory lies in this checkpoint's mapping (true of every non-empty tensor as read)."""
        start, end = _storage_span(tensor)
        return self.span is not None and end > start and self.span[0] <= start and end <= self.span[1]


def in_file_order(state: dict):
    """Yields the (key, tensor) pairs of `state`. For a MappedCheckpoint: first its mapped tensors in the order of
    the file, and before each step the pages of the file before the next tensor are released (resident memory
    drops; read again, they come back from the file), so a walk keeps about one tensor of the checkpoint resident
    instead of every page it has read; then the other tensors (empty ones, or put in the dict after reading). The
    consumer must be done with a tensor when it asks for the next, and must not have written to the mapped tensors
    (a released page forgets the write). Any other dict: its items, in its order."""
    if not isinstance(state, MappedCheckpoint) or state.span is None:
        yield from state.items()
        return
    inside = sorted(((k, v) for k, v in state.items() if state.mapped(v)), key=lambda kv: _storage_span(kv[1])[0])
    release = _page_releaser()
    released = state.span[0]  # page-aligned, as every mapping
    for key, value in inside:
        below = _storage_span(value)[0] // _PAGE * _PAGE
        if release is not None and below > released:
            release(released, below - released)
            released = below
        yield key, value
    if release is not None and state.span[1] > released:
        release(released, state.span[1] - released)
    yield from ((k, v) for k, v in state.items() if not state.mapped(v))


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
