"""Routing diagnosis: where does each evaluated task send its tokens, and why.

Input: the routing output directory of an evaluation (`RoutingDistribution`: one `<dataset>.safetensors` per
dataset, read with `load_routing_distribution`), optionally the evaluated checkpoint (for the router vectors)
and the experts' names (`experts.json`, written by run_concatenate beside the concatenated best.pt).

Per module (linear layer with a router) it reports:
- `mass`: the task-by-expert mass matrix, row t = the mean routing probability vector of task t's tokens;
- `own_mass`: for each task that has an expert of its own, the mass on that expert (chance = 1/N);
- `top_expert` per task and `collapsed`: True when more than `collapse_threshold` (default 80%) of the tasks
  share the same top expert (the expert of largest mass), i.e. the module sends most tasks to one expert;
- `gate_cosine`: similarity of the experts' router vectors, the cosine of the standardised vectors (= the
  Pearson correlation of the raw vectors): mean and max over expert pairs, the full matrix for N <= 32;
- `common_score_fraction`: how much of the router scores is common to all tokens. With s_t (N) the
  pre-softmax score vector of token t and Var_e the (biased) variance across experts,

      common_score_fraction = Var_e(mean_t s_t) / mean_t Var_e(s_t)

  The softmax ignores a shift common to all experts, so only spread across experts matters. The denominator
  is the total across-expert spread; it splits exactly into the spread of the token-mean score vector (a
  per-expert constant every token carries) plus the mean spread of the per-token deviations from it, so the
  fraction lies in [0, 1]: 1 means every token gets the same score vector up to a shift, hence the same
  ranking of experts, whatever the token. `common_score_fraction` pools all evaluated tokens of all tasks
  (a constant shared by every task is what makes one expert win everywhere);
  `common_score_fraction_per_task` uses each task's tokens alone.

Modules are grouped as encoder self-attn, encoder FFN, decoder self-attn, cross-attn q/o, cross-attn k/v,
decoder FFN (others: "other"; colm.models.architecture.module_group). Outputs (`write_diagnosis`):
`routing_diagnosis.json` (everything above), `routing_diagnosis.md` (per group: own-expert mass, collapsed
modules, common-score fraction, gate cosine; per task: own-expert mass by side), `task_by_expert_encoder.png` and
`task_by_expert_decoder.png`.
"""

import glob
import json
import os
from collections import Counter, OrderedDict

import numpy as np
import torch

from colm.formats import keys as K
from colm.formats.checkpoint_io import read_checkpoint
from colm.formats.experts_file import read_experts_file
from colm.formats.layout import BEST_CHECKPOINT, EXPERTS_FILE, TASK_BY_EXPERT_FILES
from colm.models.architecture import module_group, module_groups
from colm.procedures.analysis import (
    ROUTING_FORMAT,
    SIDE_TITLES,
    load_routing_distribution,
    save_task_by_expert_heatmap,
    task_by_expert,
)
from colm.utils.atomic import atomic_path

COLLAPSE_THRESHOLD = 0.8
MAX_MATRIX_EXPERTS = 32  # gate-cosine matrices are written in full up to this many experts
OUTPUT_FILES = {"json": "routing_diagnosis.json", "markdown": "routing_diagnosis.md", **TASK_BY_EXPERT_FILES}


def dataset_stem(dataset: str) -> str:
    """The scope stem of an evaluated dataset: D/TOYREVERSE/EVAL -> TOYREVERSE, D/FLANV2BOOLQ/ZS/EVAL ->
    FLANV2BOOLQ/ZS (the form of colm.datasets.settings scopes)."""
    parts = dataset.split("/")
    if parts and parts[0] == "D":
        parts = parts[1:]
    if len(parts) > 1 and parts[-1] in ("EVAL", "TRAIN"):
        parts = parts[:-1]
    return "/".join(parts)


def load_routing_dir(directory: str) -> "OrderedDict":
    """{dataset: load_routing_distribution(...)} for every routing file in the directory, sorted by dataset."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"No routing output directory {directory}: evaluate with "
                                "'P/EVALUATE/Evaluator.analysis_processors=[@RoutingDistribution()]' "
                                "(it writes exp_out/<exp_name>/routing_distribution/).")
    found = {}
    for path in sorted(glob.glob(os.path.join(directory, "*.safetensors"))):
        loaded = load_routing_distribution(path)
        found[loaded["dataset"] or os.path.basename(path)[: -len(".safetensors")]] = loaded
    if not found:
        old = glob.glob(os.path.join(directory, "*.pickle"))
        raise FileNotFoundError(
            f"{directory} holds no routing distribution (<dataset>.safetensors, format {ROUTING_FORMAT})"
            + (f"; its {len(old)} .pickle file(s) come from an older version: evaluate again." if old else "."))
    return OrderedDict(sorted(found.items()))


def expert_entries(n_experts, experts_file=None, names=None):
    """[{"index", "name", "scope"}] for N experts: from an experts.json, else from names (scopes as
    colm.datasets.settings.get_setting gives them, None where it cannot), else "0".."N-1" without scopes."""
    if experts_file:
        entries = read_experts_file(experts_file)
        if len(entries) != n_experts:
            raise ValueError(f"{experts_file} names {len(entries)} experts but the routing output has {n_experts}: "
                             "it belongs to another checkpoint.")
        return entries
    if names is not None and len(names) == n_experts and names != [str(i) for i in range(n_experts)]:
        from colm.datasets.settings import get_setting

        try:
            scopes = list(get_setting(list(names), check_scopes=False).values())
        except (ValueError, TypeError):
            scopes = [None] * n_experts
        return [{"index": i, "name": n, "scope": s} for i, (n, s) in enumerate(zip(names, scopes))]
    return [{"index": i, "name": str(i), "scope": None} for i in range(n_experts)]


def own_experts(datasets, experts, mapping=None) -> dict:
    """{dataset: index of its own expert, or None}. mapping: {dataset: expert name or index} (wins); other
    datasets match when their scope stem equals an expert's scope (D/TOYX/EVAL and scope TOYX), or, without
    scopes, the expert's name upper-cased."""
    by_name = {e["name"]: e["index"] for e in experts}
    by_scope = {}
    for e in experts:
        by_scope.setdefault(str(e["scope"] if e["scope"] else e["name"]).upper(), e["index"])
    mapping = dict(mapping or {})
    unknown = [d for d in mapping if d not in datasets]
    if unknown:
        raise ValueError(f"own-expert mapping names dataset(s) {unknown} that the routing output lacks; it has "
                         f"{list(datasets)[:6]}...")
    out = {}
    for dataset in datasets:
        if dataset in mapping:
            value = mapping[dataset]
            if isinstance(value, int) or (isinstance(value, str) and value.isdigit() and value not in by_name):
                index = int(value)
                if not 0 <= index < len(experts):
                    raise ValueError(f"own expert of {dataset}: index {index} is outside 0..{len(experts) - 1}.")
            elif value in by_name:
                index = by_name[value]
            else:
                raise ValueError(f"own expert of {dataset}: no expert named {value!r}; experts are "
                                 f"{[e['name'] for e in experts][:8]}...")
            out[dataset] = index
        else:
            out[dataset] = by_scope.get(dataset_stem(dataset).upper())
    return out


def standardized(v: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    var, mean = torch.var_mean(v, dim=-1, correction=0, keepdim=True)
    return (v - mean) * torch.rsqrt(var + eps)


def gate_cosines(state: dict) -> dict:
    """{module: (N, N) float64 cosine similarity of the standardised router vectors} from a checkpoint's
    `<module>._addons.router.expert_embeddings__<i>` keys."""
    vectors = {}
    for key, value in state.items():
        parsed = K.parse_indexed(key)
        if parsed is not None and parsed.is_router:
            vectors.setdefault(parsed.module, {})[parsed.index] = value
    out = {}
    for module, by_index in vectors.items():
        if sorted(by_index) != list(range(len(by_index))):
            raise ValueError(f"checkpoint router vectors of {module} have indices {sorted(by_index)[:8]}..., "
                             "expected 0..N-1.")
        g = torch.stack([by_index[i].double().reshape(-1) for i in range(len(by_index))])
        z = torch.nn.functional.normalize(standardized(g), dim=-1)
        out[module] = (z @ z.T).numpy()
    return out


def common_score_fraction(mean_scores, mean_score_variance):
    """Var_e(mean_t s_t) / mean_t Var_e(s_t) (module docstring); None without scores or spread."""
    if mean_scores is None or mean_score_variance is None or mean_score_variance <= 0:
        return None
    return float(np.var(np.asarray(mean_scores, dtype=np.float64)) / mean_score_variance)


def _rounded(value, digits=6):
    if value is None:
        return None
    if isinstance(value, np.ndarray):
        return np.round(value.astype(np.float64), digits).tolist()
    return round(float(value), digits)


def diagnose(routing, experts=None, own=None, gates=None, collapse_threshold=COLLAPSE_THRESHOLD) -> dict:
    """The diagnosis as a JSON-ready dict (module docstring).

    routing: {dataset: load_routing_distribution output}; experts: expert_entries output (default: from the
    names in the routing files); own: {dataset: own expert index or None} (default: own_experts); gates:
    gate_cosines output or None.
    """
    datasets = list(routing)
    if not datasets:
        raise ValueError("No routing distributions to diagnose.")
    modules = []
    for loaded in routing.values():
        modules += [m for m in loaded["modules"] if m not in modules]
    n_experts = len(next(iter(routing[datasets[0]]["modules"].values()))["mean_probs"])
    if experts is None:
        experts = expert_entries(n_experts, names=routing[datasets[0]]["experts"])
    if len(experts) != n_experts:
        raise ValueError(f"{len(experts)} expert names for {n_experts} experts in the routing output.")
    names = [e["name"] for e in experts]
    own = own_experts(datasets, experts) if own is None else own
    if not 0 < collapse_threshold < 1:
        raise ValueError(f"collapse_threshold must lie in (0, 1), got {collapse_threshold}.")

    per_module = OrderedDict()
    for module in modules:
        present = [d for d in datasets if module in routing[d]["modules"] and routing[d]["modules"][module]["tokens"]]
        if not present:
            continue
        stats = {d: routing[d]["modules"][module] for d in present}
        for d, s in stats.items():
            if len(s["mean_probs"]) != n_experts:
                raise ValueError(f"{d}, {module}: {len(s['mean_probs'])} experts, other modules have {n_experts}.")
        mass = np.stack([np.asarray(stats[d]["mean_probs"], dtype=np.float64) for d in present])
        top = mass.argmax(axis=1)
        top_expert, top_count = Counter(top.tolist()).most_common(1)[0]
        share = top_count / len(present)
        entry = {
            "group": module_group(module),
            "tasks": present,
            "tokens": [int(stats[d]["tokens"]) for d in present],
            "mass": _rounded(mass),
            "top_expert": [names[i] for i in top],
            "most_common_top_expert": names[top_expert],
            "top_expert_share": _rounded(share),
            "collapsed": bool(len(present) >= 2 and share > collapse_threshold),
            "own_mass": {d: _rounded(mass[row, own[d]]) for row, d in enumerate(present) if own.get(d) is not None},
        }
        with_scores = [d for d in present if stats[d].get("mean_scores") is not None]
        entry["common_score_fraction_per_task"] = {
            d: _rounded(common_score_fraction(stats[d]["mean_scores"], stats[d]["mean_score_variance"]))
            for d in with_scores}
        if with_scores:
            weights = np.array([stats[d]["tokens"] for d in with_scores], dtype=np.float64)
            pooled_mean = np.average(np.stack([stats[d]["mean_scores"] for d in with_scores]), axis=0,
                                     weights=weights)
            pooled_variance = float(np.average([stats[d]["mean_score_variance"] for d in with_scores],
                                               weights=weights))
            entry["common_score_fraction"] = _rounded(common_score_fraction(pooled_mean, pooled_variance))
            entry["mean_scores"] = _rounded(pooled_mean)
        else:
            entry["common_score_fraction"] = None
        if gates is not None and module in gates:
            cos = gates[module]
            if cos.shape != (n_experts, n_experts):
                raise ValueError(f"checkpoint has {cos.shape[0]} router vectors at {module}, the routing output "
                                 f"{n_experts} experts: they do not belong together.")
            off = cos[~np.eye(n_experts, dtype=bool)]
            i, j = np.unravel_index(np.argmax(np.where(np.eye(n_experts, dtype=bool), -np.inf, cos)), cos.shape)
            entry["gate_cosine"] = {
                "mean": _rounded(off.mean()) if off.size else None, "max": _rounded(off.max()) if off.size else None,
                "most_similar_pair": [names[i], names[j]] if off.size else None,
                "matrix": _rounded(cos) if n_experts <= MAX_MATRIX_EXPERTS else None}
        per_module[module] = entry

    groups = OrderedDict()
    for group in module_groups() + ["other"]:
        members = [m for m, e in per_module.items() if e["group"] == group]
        if not members:
            continue
        own_values = [v for m in members for v in per_module[m]["own_mass"].values()]
        fractions = [per_module[m]["common_score_fraction"] for m in members
                     if per_module[m]["common_score_fraction"] is not None]
        cosines = [per_module[m]["gate_cosine"]["mean"] for m in members
                   if per_module[m].get("gate_cosine", {}).get("mean") is not None]
        groups[group] = {
            "modules": len(members),
            "own_expert_mass": _rounded(np.mean(own_values)) if own_values else None,
            "collapsed_modules": sum(per_module[m]["collapsed"] for m in members),
            "collapsed_to": dict(Counter(per_module[m]["most_common_top_expert"] for m in members
                                         if per_module[m]["collapsed"])),
            "common_score_fraction": _rounded(np.mean(fractions)) if fractions else None,
            "gate_cosine_mean": _rounded(np.mean(cosines)) if cosines else None,
        }

    sides = OrderedDict()
    for side in ("encoder", "decoder"):
        tasks, matrix = task_by_expert({d: routing[d]["modules"] for d in datasets}, side)
        if tasks:
            sides[side] = {"tasks": tasks, "mass": _rounded(matrix),
                           "own_mass": {t: _rounded(matrix[r, own[t]]) for r, t in enumerate(tasks)
                                        if own.get(t) is not None}}
    return {
        "experts": experts,
        "datasets": datasets,
        "own_expert": {d: (names[i] if i is not None else None) for d, i in own.items()},
        "chance": _rounded(1.0 / n_experts),
        "collapse_threshold": collapse_threshold,
        "groups": groups,
        "sides": sides,
        "modules": per_module,
    }


def _cell(value, digits=3):
    return "-" if value is None else f"{value:.{digits}f}"


def diagnosis_markdown(diagnosis: dict) -> str:
    n = len(diagnosis["experts"])
    held_in = [d for d, e in diagnosis["own_expert"].items() if e is not None]
    lines = [
        "# Routing diagnosis", "",
        f"{n} experts, {len(diagnosis['datasets'])} evaluated datasets ({len(held_in)} with an expert of their own). "
        f"Own-expert mass: the routing mass a task puts on its own expert, mean over the group's modules and those "
        f"tasks (chance = 1/{n} = {diagnosis['chance']:.3f}). Collapsed: modules where more than "
        f"{diagnosis['collapse_threshold']:.0%} of the tasks have the same top expert. Common-score fraction: "
        "Var_e(mean_t s_t) / mean_t Var_e(s_t) of the router scores over all evaluated tokens (1: every token "
        "ranks the experts alike). Gate cosine: mean over expert pairs of the cosine of the standardised "
        "router vectors.", "",
        "| module group | modules | own-expert mass | collapsed modules | collapsed to | common-score fraction "
        "| gate cosine |",
        "|---|---|---|---|---|---|---|",
    ]
    for group, g in diagnosis["groups"].items():
        to = ", ".join(f"{name} ({count})" for name, count in sorted(g["collapsed_to"].items(), key=lambda x: -x[1]))
        lines.append(f"| {group} | {g['modules']} | {_cell(g['own_expert_mass'])} | {g['collapsed_modules']} "
                     f"| {to or '-'} | {_cell(g['common_score_fraction'])} | {_cell(g['gate_cosine_mean'])} |")
    sides = diagnosis["sides"]
    if held_in and sides:
        lines += ["", "Own-expert mass per task (mean over the side's modules):", "",
                  "| task | own expert | " + " | ".join(f"{s} side" for s in sides) + " |",
                  "|---|---|" + "---|" * len(sides)]
        for d in held_in:
            cells = [_cell(sides[s]["own_mass"].get(d)) for s in sides]
            lines.append(f"| {d} | {diagnosis['own_expert'][d]} | " + " | ".join(cells) + " |")
    lines += ["", "Heatmaps: " + ", ".join(f"`{OUTPUT_FILES[s]}`" for s in sides) + "; everything per module in "
              f"`{OUTPUT_FILES['json']}`.", ""]
    return "\n".join(lines)


def write_diagnosis(diagnosis: dict, out_dir: str) -> dict:
    """Writes the JSON, the markdown summary and the two task-by-expert heatmaps; returns {kind: path}."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    paths["json"] = os.path.join(out_dir, OUTPUT_FILES["json"])
    with atomic_path(paths["json"]) as tmp:
        with open(tmp, "w") as f:
            json.dump(diagnosis, f, indent=1)
    paths["markdown"] = os.path.join(out_dir, OUTPUT_FILES["markdown"])
    with atomic_path(paths["markdown"]) as tmp:
        with open(tmp, "w") as f:
            f.write(diagnosis_markdown(diagnosis))
    names = [e["name"] for e in diagnosis["experts"]]
    index = {name: i for i, name in enumerate(names)}
    for side, data in diagnosis["sides"].items():
        own = {row: index[diagnosis["own_expert"][t]] for row, t in enumerate(data["tasks"])
               if diagnosis["own_expert"].get(t) is not None}
        paths[side] = os.path.join(out_dir, OUTPUT_FILES[side])
        save_task_by_expert_heatmap(np.asarray(data["mass"]), data["tasks"], names, paths[side],
                                    f"Routing mass by task, {SIDE_TITLES[side]}, mean over modules "
                                    "(outlined: the task's own expert)", own)
    return paths


def run_routing_diagnosis(routing_dir, checkpoint=None, experts_file=None, own_expert=None, out_dir=None,
                          collapse_threshold=COLLAPSE_THRESHOLD) -> dict:
    """Reads `routing_dir` (and the checkpoint / experts file; by default `<routing_dir>/../best.pt` and
    `<routing_dir>/../experts.json` when they exist; checkpoint=False skips the gate similarity), diagnoses,
    writes to out_dir (default `<routing_dir>/diagnosis`). own_expert: {dataset: expert name or index}."""
    routing = load_routing_dir(routing_dir)
    parent = os.path.dirname(os.path.abspath(routing_dir))
    if experts_file is None and os.path.isfile(os.path.join(parent, EXPERTS_FILE)):
        experts_file = os.path.join(parent, EXPERTS_FILE)
    if checkpoint is None and os.path.isfile(os.path.join(parent, BEST_CHECKPOINT)):
        checkpoint = os.path.join(parent, BEST_CHECKPOINT)
    first = next(iter(routing.values()))
    n_experts = len(next(iter(first["modules"].values()))["mean_probs"])
    experts = expert_entries(n_experts, experts_file, first["experts"])
    own = own_experts(list(routing), experts, own_expert)
    gates = gate_cosines(read_checkpoint(checkpoint)) if checkpoint else None
    diagnosis = diagnose(routing, experts, own, gates, collapse_threshold)
    diagnosis["sources"] = {"routing_dir": routing_dir, "checkpoint": checkpoint or None,
                            "experts_file": experts_file}
    return write_diagnosis(diagnosis, out_dir or os.path.join(routing_dir, "diagnosis"))
