"""Concatenating one-expert checkpoints into one MoE checkpoint (spec 4.6) and printing per-expert commands.

Expert `<name>` is read from `exp_out/datasets_concatenated/<name>_<suffix>/best.pt` (its keys carry index 0)
and becomes expert i, i = the name's position in the setting (`colm/datasets/settings.py`); a list may name
experts of your own ("MyEcho", "MyTask:MYSCOPE"). Beside the concatenated `best.pt`, `experts.json` names the experts in
index order (colm/formats/experts_file.py), so that analyses can label experts by name.

With `run_concatenate.library="<dir>"` (or list items that are paths), the experts are expert library entries
instead (colm/checkpoints/library.py): `<dir>/<name>/expert.safetensors`, in the order listed, reading only the
listed entries.
"""

import os

import gin

from colm.checkpoints import library as lib
from colm.checkpoints.averaged_hiddens import REINIT_SCRIPT
from colm.datasets.settings import get_setting
from colm.formats import keys as K
from colm.formats.checkpoint_io import checkpoint_exists, experiment_file, read_checkpoint, write_experiment
from colm.formats.experts_file import write_experts_file
from colm.formats.layout import CONCATENATED_DIR, checkpoint_file, expert_path
from colm.utils.coerce import as_bool
from colm.utils.run_dir import unfinished_warning


def _setting(datasets):
    """{name: scope} of a setting or list of names (colm.datasets.settings.get_setting). Concatenation reads files
    by name only, so names of your own need no dataset registry here: their scopes ("Name:SCOPE", or derived from
    the name) are not checked, and only the printed per-expert commands use them."""
    if datasets is None or (not isinstance(datasets, str) and len(datasets) == 0):
        raise ValueError("run_concatenate.datasets is empty: bind a setting name (e.g. run_concatenate.datasets="
                         "\"Full\") or a list of expert names (names of your own too: [\"MyEcho\", \"MyTask:MYSCOPE\"]).")
    return get_setting(datasets, check_scopes=False)


def _single_quoted(text: str) -> str:
    """Shell single quotes around text (an embedded ' becomes '\\'')."""
    return "'" + text.replace("'", "'\\''") + "'"


def reinit_router_commands(setting, arch="A2", suffix="lora", compute_hiddens=False, hiddens_suffix="_a2",
                           extra_bindings="") -> str:
    """The `;`-joined reinit_router_embedding.sh commands of the average-activation pass (spec 4.8.3 step 1)."""
    compute = as_bool(compute_hiddens, "run_concatenate.compute_hiddens")
    return "; ".join(
        f"bash {REINIT_SCRIPT} -exp_name {expert_path(name, suffix)} -dataset {scope} -arch {arch} "
        f"-compute_hiddens {compute} -hiddens_suffix {hiddens_suffix} -extra_bindings {_single_quoted(extra_bindings)}"
        for name, scope in setting.items()
    )


def one_expert(state: dict, source: str, index: int):
    """(expert/router entries renamed __0 -> __index, embedding entries) of a one-expert checkpoint.

    Gates (expert_input_gate / expert_output_gate) are dropped. Refuses an index other than 0, any other key,
    and experts without a router vector or router vectors without an expert.
    """
    renamed = {}
    for key, value in state.items():
        if K.is_embedding_key(key) or K.is_gate_key(key):
            continue
        parsed = K.parse_indexed(key)
        if parsed is None:
            raise ValueError(f"{source}: unexpected key {key!r}; a one-expert checkpoint holds only layer1__0, "
                             "layer2__0, expert_embeddings__0, gates and embed_tokens keys.")
        if parsed.index != 0:
            raise ValueError(f"{source}: key {key!r} has expert index {parsed.index}; each input must hold one expert "
                             "with index 0 (the output of put_index_to_lora or gate training).")
        renamed[parsed.with_index(index)] = value
    if not renamed:
        raise ValueError(f"{source} holds no expert keys (layer1__0 / layer2__0 / expert_embeddings__0).")
    _check_complete(renamed, source)
    return {p.key: v for p, v in renamed.items()}, K.embedding_entries(state)


def _check_complete(entries: dict, source: str) -> None:
    by_param = {param: {p.module for p in entries if p.param == param} for param in (K.LAYER1, K.LAYER2, K.EMBEDDINGS)}
    problems = [
        (by_param[K.LAYER1] ^ by_param[K.LAYER2], "have only one of layer1 / layer2"),
        (by_param[K.LAYER1] - by_param[K.EMBEDDINGS], "have an expert but no router vector"),
        (by_param[K.EMBEDDINGS] - by_param[K.LAYER1], "have a router vector but no expert"),
    ]
    for modules, problem in problems:
        if modules:
            raise ValueError(f"{source}: {len(modules)} module(s) {problem}, e.g. {sorted(modules)[:2]}. "
                             "Run put_index_to_lora (and use_input_gate_as_router) on the expert first.")


def _layout(entries: dict) -> dict:
    """{key with index 0: shape}: what every expert must share to be stacked."""
    return {K.parse_indexed(k).with_index(0).key: tuple(v.shape) for k, v in entries.items()}


def concatenate_states(named_states) -> dict:
    """Concatenates (source, one-expert state) pairs, in order, into one checkpoint with experts 0..N-1.

    The embedding keys come from the first checkpoint only. `named_states` may be a generator, so that only
    one expert file is in memory besides the result.
    """
    out_embeddings, out_experts, reference = {}, {}, None
    for index, (source, state) in enumerate(named_states):
        entries, embeddings = one_expert(state, source, index)
        layout = _layout(entries)
        if reference is None:
            reference, first_source, out_embeddings = layout, source, embeddings
        elif layout != reference:
            key = next(iter(sorted(set(layout.items()) ^ set(reference.items()))))[0]
            raise ValueError(f"{source} does not match {first_source}: {key} is "
                             f"{layout.get(key, 'missing')} vs {reference.get(key, 'missing')}. All experts need the "
                             "same modules and shapes (same base model and LoRA rank).")
        out_experts.update(entries)
    if reference is None:
        raise ValueError("No checkpoints to concatenate.")
    return {**out_embeddings, **out_experts}


def _read_all(files: dict):
    for name, file in files.items():
        warning = unfinished_warning(file)  # e.g. a gate training that was killed
        if warning:
            print(warning)
        yield f"{file} (expert {name})", read_checkpoint(file)


@gin.configurable
def run_concatenate(arch="A2", datasets=(), print_commands=False, suffix="lora",
                    out_path="CompleteA2_lora_concatenated", compute_hiddens=False, hiddens_suffix="_a2",
                    extra_bindings="", expert_dir=CONCATENATED_DIR, library=None):
    """Concatenates the setting's experts into exp_out/<out_path>/best.pt, or with print_commands=True prints
    (and returns) the per-expert reinit_router_embedding.sh commands instead. Experts are read from
    exp_out/<expert_dir>/<name>_<suffix>/best.pt (expert_dir "datasets_concatenated", as in the original), or,
    with `library` bound or entries given by path, from expert library entries (suffix and expert_dir unused)."""
    if not as_bool(print_commands, "run_concatenate.print_commands") and lib.uses_library(datasets, library):
        return concatenate_library_entries(datasets, library, out_path)
    setting = _setting(datasets)
    if as_bool(print_commands, "run_concatenate.print_commands"):
        commands = reinit_router_commands(setting, arch, suffix, compute_hiddens, hiddens_suffix, extra_bindings)
        print(commands)
        return commands
    out_file = checkpoint_file(out_path, "run_concatenate.out_path")
    # expert_dir may be a gs://bucket/prefix as well as a folder under exp_out/
    files = {name: experiment_file(expert_path(name, suffix, expert_dir)) for name in setting}
    missing = [f for f in files.values() if not checkpoint_exists(f)]
    if missing:
        raise FileNotFoundError(
            f"run_concatenate: {len(missing)} of {len(files)} expert checkpoints missing: {missing}. Each comes from "
            f"put_index_to_lora (out_path=\"{expert_dir}/<name>_<suffix>\") or gate training; check "
            f"run_concatenate.suffix={suffix!r}."
        )
    state = concatenate_states(_read_all(files))
    write_experiment(state, out_path, "run_concatenate.out_path")
    names_file = write_experts_file(os.path.dirname(out_file), setting)
    print(f"[colm] run_concatenate: {len(files)} experts -> {out_file} (names in {names_file})")
    return out_file


def concatenate_library_entries(entries, library, out_path) -> str:
    """Concatenates expert library entries (names under `library`, paths, or a setting name) in the order given
    into exp_out/<out_path>/best.pt and its experts.json; reads only the listed entries."""
    out_file = checkpoint_file(out_path, "run_concatenate.out_path")
    resolved = lib.resolve_entries(entries, library)
    state = concatenate_states(lib.read_entries(resolved))
    write_experiment(state, out_path, "run_concatenate.out_path")
    names_file = write_experts_file(os.path.dirname(out_file), {name: scope for name, scope, _, _ in resolved})
    print(f"[colm] run_concatenate: {len(resolved)} library entries -> {out_file} (names in {names_file})")
    return out_file


_STAGE_BINDINGS = {
    # stage: (bindings per expert name n with suffix s)
    "put_index_to_lora": lambda n, s: [f'put_index_to_lora.path="{n}_{s}"',
                                       f'put_index_to_lora.out_path="{expert_path(n, s)}"'],
    "use_input_gate_as_router": lambda n, s: [f'use_input_gate_as_router.path="{expert_path(n, s)}"'],
    "delete_expert_input_gate": lambda n, s: [f'delete_expert_input_gate.path="{expert_path(n, s)}"'],
}


@gin.configurable
def commands_concatenate(datasets=(), stage="put_index_to_lora", suffix="t5xl_lora"):
    """Prints (and returns) the `;`-joined per-expert `python scripts/manipulations.py` commands of one stage:
    put_index_to_lora (exp_out/<name>_<suffix> -> datasets_concatenated/<name>_<suffix>),
    use_input_gate_as_router or delete_expert_input_gate (in place on datasets_concatenated/<name>_<suffix>)."""
    if stage not in _STAGE_BINDINGS:
        raise ValueError(f"commands_concatenate: unknown stage {stage!r}; choose one of {sorted(_STAGE_BINDINGS)}.")
    setting = _setting(datasets)
    commands = "; ".join(
        "python scripts/manipulations.py --gin_bindings "
        + " ".join(_single_quoted(b) for b in [f"func_caller.func=@{stage}"] + _STAGE_BINDINGS[stage](name, suffix))
        for name in setting
    )
    print(commands)
    return commands
