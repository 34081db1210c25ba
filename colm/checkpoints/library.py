"""Expert library operations (the on-disk format is colm/formats/expert_library.py): adding a one-expert checkpoint,
splitting a concatenated checkpoint into one entry per expert, and resolving a list of entries for concatenation
(colm/checkpoints/concatenate.py, `run_concatenate.library`).

A checkpoint is named by its experiment path relative to exp_out/ (its best.pt) or by a checkpoint file.
"""

import datetime
import os
import re
import shlex
import sys

import torch

from colm.datasets.settings import get_setting
from colm.formats import expert_library as L
from colm.formats import keys as K
from colm.formats.checkpoint_io import read_checkpoint
from colm.formats.experts_file import read_experts_file
from colm.formats.layout import EXPERTS_FILE, checkpoint_file
from colm.utils.model_types import MODELS_DIR, chosen_model_type
from colm.utils.paths import expand
from colm.utils.run_dir import unfinished_warning

_BASE_MODEL = re.compile(r'^M/MODEL/hf_torch_model\.model_name_or_path\s*=\s*"([^"]+)"', re.M)


def checkpoint_path(checkpoint: str) -> str:
    """A checkpoint file as given, else exp_out/<checkpoint>/best.pt."""
    return checkpoint if os.path.isfile(checkpoint) else checkpoint_file(checkpoint, "checkpoint")


def default_base_model(model_type=None):
    """The base model the model type's gin files load (M/MODEL/hf_torch_model.model_name_or_path), or None."""
    directory = os.path.join(MODELS_DIR, chosen_model_type(model_type))
    for name in sorted(os.listdir(directory)):
        if name.endswith(".gin"):
            with open(os.path.join(directory, name)) as f:
                match = _BASE_MODEL.search(f.read())
            if match:
                return match.group(1)
    return None


def _command() -> str:
    return shlex.join([os.path.basename(sys.executable)] + sys.argv)


def _scope(name: str) -> str:
    """The dataset scope of an expert name: the setting table's, else derived from the name (settings.py)."""
    return get_setting([name], check_scopes=False)[name]


# ------------------------------------------------------------------------------------------------ adding


def entry_state(state: dict, what: str) -> tuple:
    """(the keys an entry stores, whether a trained gate is its router vector) of a one-expert checkpoint
    (put_index_to_lora's layout, after gate training or not). Gates and embed_tokens are dropped; a gate that was
    not yet copied into the router vectors is refused, as is anything but expert index 0."""
    out, gates = {}, {}
    for key, value in state.items():
        if K.is_embedding_key(key):
            continue
        gate = K.parse_gate(key)
        if gate is not None:
            if gate[1] == K.INPUT_GATE:
                gates[gate[0]] = value
            continue
        parsed = K.parse_indexed(key)
        if parsed is None:
            hint = " Convert it with put_index_to_lora first." if K.parse_lora(key) else ""
            raise ValueError(f"{what}: unexpected key {key!r}; a library entry comes from a one-expert checkpoint "
                             f"(layer1__0, layer2__0, expert_embeddings__0, gates).{hint}")
        if parsed.index != 0:
            raise ValueError(f"{what}: key {key!r} has expert index {parsed.index}; add a one-expert checkpoint, or "
                             "split a concatenated one (`python scripts/expert_library.py split`).")
        out[key] = value
    K.validate_experts(out, what)
    gate_is_router = bool(gates)
    for module, gate in gates.items():
        router = out.get(K.router_key(module, 0))
        if router is not None and not bool(router.any()):
            raise ValueError(f"{what} carries a trained gate but zero router vectors (e.g. at {module}): copy the "
                             "gates first with func_caller.func=@use_input_gate_as_router "
                             "(README, PHATGOOSE step 3).")
        gate_is_router = gate_is_router and router is not None and torch.equal(router, gate)
    return out, gate_is_router


def router_kind(state: dict) -> str:
    """"none" (no router vectors), "zero" (put_index_to_lora's placeholders) or "set" (a gate, averages ...)."""
    routers = [v for k, v in state.items() if K.is_router_key(k)]
    if not routers:
        return "none"
    return "set" if any(bool(v.any()) for v in routers) else "zero"


def entry_metadata(state: dict, scope: str, source: str, gate: bool = False, model_type=None, base_model=None,
                   command=None) -> dict:
    """The metadata of an entry holding `state` (the name is added when written)."""
    modules = K.expert_modules(state)
    ranks = sorted({state[K.layer1_key(m, 0)].shape[1] for m in modules})
    model_type = chosen_model_type(model_type)
    return {
        "format_version": L.FORMAT_VERSION,
        "scope": scope,
        "model_type": model_type,
        "base_model": base_model or default_base_model(model_type),
        "rank": ranks[0] if len(ranks) == 1 else ranks,
        "dtype": str(next(iter(state.values())).dtype).replace("torch.", ""),
        "modules": modules,
        "router_vectors": router_kind(state),
        "gate": gate,
        "source": source,
        "command": command or _command(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def add_to_library(checkpoint: str, library: str, name: str, scope=None, model_type=None, base_model=None,
                   command=None, overwrite: bool = False) -> str:
    """Adds a one-expert checkpoint (e.g. exp_out/datasets_concatenated/<name>_<suffix>/best.pt after
    use_input_gate_as_router) as <library>/<name>/; returns the entry directory. Reads that file only."""
    L.check_name(name)
    file = checkpoint_path(checkpoint)
    warning = unfinished_warning(file)
    if warning:
        print(warning)
    state, gate = entry_state(read_checkpoint(file), file)
    metadata = entry_metadata(state, scope or _scope(name), file, gate, model_type, base_model, command)
    entry = L.write_entry(library, name, state, metadata, overwrite)
    print(f"[colm] added {file} to the expert library as {entry} (router vectors: {metadata['router_vectors']})")
    return entry


# ------------------------------------------------------------------------------------------------ splitting


def _split_names(file: str, count: int, names=None, setting=None) -> dict:
    """{name: scope} of a concatenated checkpoint's experts in index order: the names given, else the experts.json
    beside it, else the setting's order (colm/datasets/settings.py)."""
    beside = os.path.join(os.path.dirname(file), EXPERTS_FILE)
    if names:
        named = get_setting(list(names), check_scopes=False)
        origin = "the names given"
    elif os.path.isfile(beside):
        named = {e["name"]: e["scope"] or _scope(e["name"]) for e in read_experts_file(beside)}
        origin = beside
    elif setting:
        named = get_setting(setting, check_scopes=False)
        origin = f"the setting {setting!r}"
    else:
        raise ValueError(f"{file} has no {EXPERTS_FILE} beside it: name its experts with a setting (--setting Full) "
                         "or the names in index order (--names ...).")
    if len(named) != count:
        raise ValueError(f"{file} holds {count} experts but {origin} names {len(named)}; they must match one to one "
                         "in index order.")
    return dict(named)


def split_checkpoint(checkpoint: str, library: str, names=None, setting=None, model_type=None, base_model=None,
                     command=None, overwrite: bool = False) -> list:
    """Writes one entry per expert of a concatenated checkpoint (expert i -> index 0 of entry <name_i>), named from
    `names`, the experts.json beside it or `setting`; returns the entry directories in index order. The embed_tokens
    keys released checkpoints carry are the frozen base model's and are not stored."""
    file = checkpoint_path(checkpoint)
    state = read_checkpoint(file)
    unknown = [k for k in state if K.parse_indexed(k) is None and not K.is_embedding_key(k)]
    if unknown:
        raise ValueError(f"{file}: key(s) {unknown[:3]} are no expert, router vector or embedding; a library entry "
                         "stores experts and router vectors only.")
    K.validate_experts(state, file)
    count = K.expert_count(state)
    named = _split_names(file, count, names, setting)
    for name in named:
        if os.path.exists(L.entry_dir(library, name)) and not overwrite:
            raise FileExistsError(f"{L.entry_dir(library, name)} exists; nothing written. Split into another library "
                                  "or pass --overwrite.")
    per_expert = [{} for _ in range(count)]
    for parsed, value in K.indexed_entries(state).items():
        per_expert[parsed.index][parsed.with_index(0).key] = value
    entries = []
    command = command or _command()
    for index, (name, scope) in enumerate(named.items()):
        one = per_expert[index]
        metadata = entry_metadata(one, scope, f"{file} (expert {index})", False, model_type, base_model, command)
        entries.append(L.write_entry(library, name, one, metadata, overwrite))
    print(f"[colm] split {file} into {count} expert library entries in {library}")
    return entries


# ------------------------------------------------------------------------------------------------ concatenating


def uses_library(datasets, library) -> bool:
    """Whether run_concatenate reads library entries: a library is bound, or the list names entries by path."""
    if library:
        return True
    items = [datasets] if isinstance(datasets, str) else list(datasets or ())
    return any(isinstance(item, str) and L.is_entry_path(item) for item in items)


def _items(datasets, library) -> list:
    """[(entry directory, name or None, explicit scope or None)] in the order given."""
    if isinstance(datasets, str) and not L.is_entry_path(datasets):  # a setting name: its experts by name
        return [(L.entry_dir(library, n), n, s) for n, s in get_setting(datasets, check_scopes=False).items()]
    out = []
    for item in [datasets] if isinstance(datasets, str) else datasets:
        if L.is_entry_path(item):
            out.append((item.rstrip("/"), None, None))
            continue
        name, _, scope = item.partition(":")
        if not library:
            raise ValueError(f"run_concatenate: {item!r} names a library entry but no library is bound; bind "
                             "run_concatenate.library=\"<library directory>\" or give the entry's path.")
        out.append((L.entry_dir(library, name), name, scope or None))
    return out


def resolve_entries(datasets, library=None) -> list:
    """[(name, scope, entry directory, metadata)] of the listed entries, in the order given. Reads each listed
    entry's expert.json and nothing else; refuses missing entries (all named), repeated names and entries that
    cannot be stacked (other model type, base model or rank)."""
    if datasets is None or (not isinstance(datasets, str) and len(datasets) == 0):
        raise ValueError("run_concatenate.datasets is empty: list the library entries to concatenate, by name "
                         "(with run_concatenate.library) or by path, or bind a setting name.")
    library = os.path.expanduser(expand(library, "run_concatenate.library")) if library else None
    resolved, missing = [], []
    for entry, name, scope in _items(datasets, library):
        try:
            metadata = L.read_metadata(entry)
        except FileNotFoundError:
            missing.append(entry)
            continue
        resolved.append((name or metadata["name"], scope or metadata["scope"], entry, metadata))
    if missing:
        where = f" (`python scripts/expert_library.py list {library}` shows what it holds)" if library else ""
        raise FileNotFoundError(f"run_concatenate: {len(missing)} of {len(missing) + len(resolved)} library entries "
                                f"missing: {missing}{where}.")
    names = [r[0] for r in resolved]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"run_concatenate: expert(s) {repeated} listed more than once; each expert gets one index.")
    first = resolved[0]
    for _, _, entry, metadata in resolved[1:]:
        for field in ("model_type", "base_model", "rank"):
            if metadata.get(field) != first[3].get(field):
                raise ValueError(f"run_concatenate: {entry} has {field} {metadata.get(field)!r} but {first[2]} has "
                                 f"{first[3].get(field)!r}; experts of one mixture share base model and LoRA rank.")
    zero = [name for name, _, _, metadata in resolved if metadata["router_vectors"] != "set"]
    if zero:
        print(f"[colm] note: {len(zero)} entries have no trained router vectors (e.g. {zero[0]}): fine for Merged "
              "Experts or before Average Activation, but routing over them is uninformed.")
    return resolved


def read_entries(resolved):
    """(source, state) of each resolved entry in turn, for concatenate_states (one entry in memory at a time)."""
    for name, _, entry, _ in resolved:
        yield f"{entry} (expert {name})", L.read_weights(entry)
