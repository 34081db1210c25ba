"""An expert library on disk: one directory per expert, so that adding an expert is adding a directory.

    <library>/<name>/expert.safetensors   the expert's keys, with index 0 (keys.py): <m>._addons.expert_lora.layer1__0,
                                          layer2__0 and, where it has one, <m>._addons.router.expert_embeddings__0
    <library>/<name>/expert.json          metadata: {"format_version", "name", "scope", "model_type", "base_model",
                                          "rank", "dtype", "modules", "router_vectors", "gate", "source", "command",
                                          "created"}

An entry is written into a temporary directory inside the library and renamed into place, so a reader sees a
complete entry or none. Entry names are plain directory names (no "/"); a list entry that contains "/" is a path
to an entry directory. Operations on entries (adding a checkpoint, splitting a concatenated one, metadata) are in
colm/checkpoints/library.py.
"""

import json
import os
import shutil
import tempfile

from colm.formats import gcs
from colm.formats import keys as K
from colm.formats.checkpoint_io import read_checkpoint, write_checkpoint
from colm.utils.atomic import TMP_PREFIX, atomic_path, fsync_directory

FORMAT_VERSION = 1
WEIGHTS_FILE = "expert.safetensors"
METADATA_FILE = "expert.json"
REQUIRED_FIELDS = ("format_version", "name", "scope", "rank", "modules", "router_vectors")
ROUTER_VECTORS = ("set", "zero", "none")  # trained/computed vectors, put_index_to_lora's zero placeholders, none


def is_entry_path(item: str) -> bool:
    """Whether a list item names an entry by path ("exp_out/lib/MyTask", "./MyTask") rather than by name."""
    return "/" in item or os.sep in item


def check_name(name: str) -> str:
    # ":" would read as "Name:SCOPE" in run_concatenate.datasets; "." starts the temporary directories.
    if (not isinstance(name, str) or not name or is_entry_path(name) or ":" in name or name.startswith(".")
            or name != name.strip()):
        raise ValueError(f"{name!r} is not an expert library entry name: use a plain directory name (no '/' or ':', "
                         "not starting with '.', no surrounding spaces).")
    return name


def entry_dir(library: str, name: str) -> str:
    return os.path.join(library, check_name(name))


def read_metadata(entry: str) -> dict:
    """The metadata of the entry directory `entry`; refuses a directory that is no (complete) entry."""
    path = os.path.join(entry, METADATA_FILE)
    if not (gcs.exists(path) if gcs.is_gcs_path(path) else os.path.isfile(path)):
        raise FileNotFoundError(f"{entry} is no expert library entry ({METADATA_FILE} missing); entries are made by "
                                "`python scripts/expert_library.py add` or `split`.")
    try:
        if gcs.is_gcs_path(path):  # a library in a bucket: gs://<bucket>/<library>/<name>/expert.json
            metadata = json.loads(gcs.read_bytes(path))
        else:
            with open(path) as f:
                metadata = json.load(f)
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} is not readable JSON: {error}") from error
    missing = [field for field in REQUIRED_FIELDS if not isinstance(metadata, dict) or field not in metadata]
    if missing:
        raise ValueError(f"{path} lacks the field(s) {missing}; re-add the expert to the library.")
    if metadata["format_version"] > FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {metadata['format_version']}; this colm reads up to "
                         f"{FORMAT_VERSION}. Update colm.")
    return metadata


def read_weights(entry: str) -> dict:
    """The entry's tensors ({key with index 0: tensor}), through checkpoint_io.read_checkpoint."""
    return read_checkpoint(os.path.join(entry, WEIGHTS_FILE))


def check_entry_state(state: dict, what: str) -> None:
    """An entry holds expert/router keys with index 0 only."""
    bad = [k for k in state if (p := K.parse_indexed(k)) is None or p.index != 0]
    if bad:
        raise ValueError(f"{what}: an expert library entry holds only <module>._addons.expert_lora.layer1__0 / "
                         f"layer2__0 and <module>._addons.router.expert_embeddings__0 keys, got {bad[:3]}.")
    if not state:
        raise ValueError(f"{what}: no expert keys to store.")


def write_entry(library: str, name: str, state: dict, metadata: dict, overwrite: bool = False) -> str:
    """Writes <library>/<name>/ (WEIGHTS_FILE, METADATA_FILE) through a temporary directory renamed into place;
    refuses an existing entry unless overwrite. Returns the entry directory."""
    final = entry_dir(library, name)
    check_entry_state(state, final)
    if os.path.exists(final) and not overwrite:
        raise FileExistsError(f"{final} exists; give the expert another name or pass overwrite (--overwrite).")
    os.makedirs(library, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{name}-", dir=library)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; give the entry a plain directory's permissions
        write_checkpoint(state, os.path.join(tmp, WEIGHTS_FILE))
        with atomic_path(os.path.join(tmp, METADATA_FILE)) as tmp_json:
            with open(tmp_json, "w") as f:
                json.dump({"name": name, **{k: v for k, v in metadata.items() if k != "name"}}, f, indent=1)
        if os.path.exists(final):  # overwrite: the old entry goes aside, the new one in, then the old is removed
            old = tmp + ".old"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old)
        else:
            os.rename(tmp, final)
        fsync_directory(library)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    return final


def list_entries(library: str) -> list:
    """The metadata of every entry of the library, by name (reads every expert.json, nothing else)."""
    if not os.path.isdir(library):
        raise FileNotFoundError(f"Expert library {library} does not exist.")
    names = sorted(n for n in os.listdir(library) if not n.startswith(".")
                   and os.path.isfile(os.path.join(library, n, METADATA_FILE)))
    return [read_metadata(os.path.join(library, n)) for n in names]
