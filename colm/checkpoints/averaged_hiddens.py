"""Average Activation router vectors (spec 4.8.3 step 3): averaged activations -> an expert's router vectors.

`insert_averaged_hiddens` reads `exp_out/<exp_name>/averaged_hiddens<suffix>/<dataset with / -> _>.safetensors`
(written by SaveAveragedHiddens, colm/procedures/averaged_hiddens.py) and writes each module's average as
`<module>._addons.router.expert_embeddings__<index>` of `exp_out/<exp_name>/best.pt`, in place (atomically).
Called inside a torchrun process group, rank 0 alone reads and rewrites best.pt (a rewrite in place must not run
twice) and the other ranks wait for it.
"""

import os

from colm.formats import keys as K
from colm.formats.checkpoint_io import read_experiment, write_experiment
from colm.formats.layout import HIDDENS_EXTENSION, checkpoint_file, hiddens_dir, hiddens_file
from colm.models import architecture as A
from colm.utils import distributed

FINAL_LAYER_NORM = A.a1_router_input()  # its pooled output is the A1 decoder router's input
DECODER_ROUTER = A.a1_router()  # A1: one router on the decoder stack, shared by every decoder linear
COMPONENTS = (None, "pretrained", "task")
# The C4 averages the "pretrained" / "task" components are taken against (the original's fixed location).
C4_EXP_NAME, C4_DATASET = "P3C4_lora", "D/C4/EVAL"
REINIT_SCRIPT = "colm/experiments/bash_scripts/reinit_router_embedding.sh"


def read_hiddens(file: str, how_to_make: str) -> dict:
    """{module: float32 tensor} from a SaveAveragedHiddens safetensors file; a missing file says how it is made.

    Never unpickles: a `.pickle` of the original (or of older colm) next to it is refused with how to remake it,
    since loading a pickle runs whatever code the file carries."""
    if not os.path.isfile(file):
        directory = os.path.dirname(file)
        stem = os.path.splitext(file)[0]
        if os.path.isfile(stem + ".pickle"):
            raise FileNotFoundError(f"{stem}.pickle holds averaged activations in the old pickle format, which colm no "
                                    f"longer loads (a pickle can run code); {file} is needed instead. {how_to_make}")
        present = (sorted(f for f in os.listdir(directory) if f.endswith(HIDDENS_EXTENSION))
                   if os.path.isdir(directory) else [])
        raise FileNotFoundError(f"No averaged activations at {file}" + (f" ({directory} holds {present})" if present
                                                                       else "") + f". {how_to_make}")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        averages = load_file(file)
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{file} is not a safetensors file written by SaveAveragedHiddens ({error}); recompute it: "
                         f"{how_to_make}") from None
    bad = sorted(name for name, vector in averages.items() if vector.dim() != 1)
    if bad:
        raise ValueError(f"{file}: {bad[:3]} are not vectors; it was not written by SaveAveragedHiddens.")
    return {name: vector.float() for name, vector in averages.items()}


def check_component(component):
    """None ("None" from the launcher), "pretrained" or "task"; refuses anything else."""
    component = None if component in (None, "None", "") else component
    if component == "specific_task":
        raise NotImplementedError("component 'specific_task' is not available: it was broken in the original "
                                  "(deleted gin files, an undefined name). Use None, 'pretrained' or 'task'.")
    if component not in COMPONENTS:
        raise ValueError(f"component={component!r}; choose None, 'pretrained' or 'task'.")
    return component


def split_component(averages: dict, c4_averages: dict, component) -> dict:
    """component "pretrained": each average projected onto the C4 average of its module;
    "task": the average minus that projection; None: unchanged."""
    component = check_component(component)
    if component is None:
        return dict(averages)
    missing = sorted(set(averages) - set(c4_averages))
    if missing:
        raise ValueError(f"The C4 averages lack {len(missing)} module(s) of the expert's, e.g. {missing[:3]}; both "
                         "must come from the same model and modules.")
    out = {}
    for name, vector in averages.items():
        c4 = c4_averages[name]
        if not bool(c4.any()):
            raise ValueError(f"The C4 average of {name} is zero: there is no direction to project onto.")
        projection = (vector @ c4) / (c4 @ c4) * c4
        out[name] = projection if component == "pretrained" else vector - projection
    return out


def insert_averaged_hiddens_state(state: dict, averages: dict, index: int = 0, arch: str = "A2") -> dict:
    """A copy of state whose router vectors of expert `index` are the averages.

    A2: every module with an expert gets its own average. A1: encoder modules get their own average and the
    decoder stack's router (`decoder._addons.router.expert_embeddings__<index>`) gets the average of
    encoder.final_layer_norm; the decoder linears' averages are not used. Refuses averages of modules
    without an expert, experts without an average, and size mismatches.
    """
    if arch not in ("A2", "A1"):
        raise ValueError(f"arch={arch!r}; choose 'A2' (a router per linear) or 'A1' (one decoder router).")
    experts = {m: v for m, v in ((m, state.get(K.layer1_key(m, index))) for m in K.expert_modules(state))
               if v is not None}
    if not experts:
        raise ValueError(f"The checkpoint has no expert {index}; it holds experts {K.expert_indices(state)}.")
    linear_averages = {m: v for m, v in averages.items() if m != FINAL_LAYER_NORM}
    for modules, problem in ((sorted(set(linear_averages) - set(experts)), f"have averages but no expert {index}"),
                             (sorted(set(experts) - set(linear_averages)), f"have expert {index} but no average")):
        if modules:
            raise ValueError(f"{len(modules)} module(s) {problem}, e.g. {modules[:3]}. The averages must come from "
                             "this expert's model (same modules, same architecture gin).")
    routers = K.router_modules(state)
    if arch == "A2":
        if DECODER_ROUTER in routers:
            raise ValueError("The checkpoint has an A1 decoder router (decoder._addons.router...); use arch A1.")
        targets = {m: linear_averages[m] for m in experts}
    else:
        per_linear = [m for m in routers if A.stack_of(m) == A.DECODER and m != DECODER_ROUTER]
        if per_linear:
            raise ValueError(f"arch A1 has one decoder router, but the checkpoint has per-linear decoder routers "
                             f"(e.g. {per_linear[0]}); make it with make_one_router_decoder, or use arch A2.")
        if FINAL_LAYER_NORM not in averages:
            raise ValueError(f"arch A1 needs the average of {FINAL_LAYER_NORM}, which the averages lack; recompute "
                             "them with SaveAveragedHiddens.")
        targets = {m: linear_averages[m] for m in experts if A.stack_of(m) != A.DECODER}
        targets[DECODER_ROUTER] = averages[FINAL_LAYER_NORM]
    out = dict(state)
    dtype = next(iter(experts.values())).dtype
    for module, vector in targets.items():
        key = K.router_key(module, index)
        # A router vector has the size of its module's input: that of the existing vector or of layer1's rows.
        like = state.get(key, experts.get(module))
        if like is not None and vector.shape != like.shape[:1]:
            raise ValueError(f"The average of {module} has {vector.shape[0]} values, {key} needs {like.shape[0]}; "
                             "the averages come from a different model size.")
        out[key] = vector.to(like.dtype if key in state else dtype)
    K.validate_experts(out, "insert_averaged_hiddens")
    return out


def insert_averaged_hiddens(exp_name, dataset, index=0, hiddens_suffix="_a2", component=None, arch="A2"):
    """Writes the averages of `dataset` (e.g. "D/P3SOCIALIQA/TRAIN") as the router vectors of expert `index`
    in exp_out/<exp_name>/best.pt; component "pretrained" / "task" first keeps only the part along / orthogonal
    to the C4 averages at exp_out/P3C4_lora/averaged_hiddens<suffix>/D_C4_EVAL.safetensors. Under torchrun rank
    0 alone does it; every rank returns its result."""
    if not distributed.is_distributed():
        return _insert_averaged_hiddens(exp_name, dataset, index, hiddens_suffix, component, arch)
    written = None
    if distributed.is_main():
        print(f"[colm] insert_averaged_hiddens: rank 0 rewrites exp_out/{exp_name}/best.pt alone; the other ranks "
              "wait for it", flush=True)
        written = _insert_averaged_hiddens(exp_name, dataset, index, hiddens_suffix, component, arch)
    return distributed.broadcast_from_main(written)


def _insert_averaged_hiddens(exp_name, dataset, index, hiddens_suffix, component, arch):
    component = check_component(component)
    scope = dataset[len("D/"):-len("/TRAIN")] if dataset.startswith("D/") and dataset.endswith("/TRAIN") else "<SCOPE>"
    averages = read_hiddens(
        hiddens_file(exp_name, dataset, hiddens_suffix),
        f"Compute them with: bash {REINIT_SCRIPT} -exp_name {exp_name} -dataset {scope} -compute_hiddens True "
        f"-hiddens_suffix {hiddens_suffix}.")
    if component is not None:
        c4_averages = read_hiddens(
            hiddens_file(C4_EXP_NAME, C4_DATASET, hiddens_suffix),
            f"The '{component}' component needs the average activations of the C4 model {checkpoint_file(C4_EXP_NAME)} "
            f"on {C4_DATASET}: run colm.main with colm/experiments/eval.gin and the arch gin, EXP_NAME={C4_EXP_NAME}, "
            f"P/EVALUATE/Evaluator.datasets=\"{C4_DATASET}\" (interface \"gen\"), "
            f"P/EVALUATE/Evaluator.analysis_processors=[@SaveAveragedHiddens()] and SaveAveragedHiddens.save_dir="
            f"\"{hiddens_dir(C4_EXP_NAME, hiddens_suffix)}\" (this needs a {C4_DATASET} scope in the "
            "dataset registries).")
        averages = split_component(averages, c4_averages, component)
    state = read_experiment(exp_name, "exp_name")
    return write_experiment(insert_averaged_hiddens_state(state, averages, int(index), arch), exp_name, "exp_name")
