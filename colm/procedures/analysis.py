"""Analysis processors: given every evaluated batch, write something per dataset.

Nothing here writes pickles: routing statistics go to safetensors (`load_routing_distribution` reads them),
everything else to JSON or PNG.
"""

import json
import os
import textwrap
import warnings

import gin
import numpy as np
import torch

from colm.formats.experts_file import read_experts_file
from colm.formats.layout import EXPERTS_FILE, TASK_BY_EXPERT_FILES, dataset_file_name
from colm.models.architecture import ENCODER, T5, token_side
from colm.moma.moe import Router
from colm.utils.atomic import atomic_path
from colm.utils.logging import log_images
from colm.utils.paths import expand


class AnalysisProcessor:
    def __init__(self, save_dir):
        self.save_dir = save_dir

    def batch_process(self, batch, outputs, global_hidden_dict, model):
        pass

    def dataset_process(self, dataset_name):
        pass

    def cross_dataset_process(self):
        pass

    def save(self, step=None):
        pass

    def path_for(self, dataset_name, suffix):
        directory = expand(self.save_dir, f"{type(self).__name__}.save_dir")
        os.makedirs(directory, exist_ok=True)
        return os.path.join(directory, dataset_file_name(dataset_name, suffix))


@gin.configurable
class WriteOutputText(AnalysisProcessor):
    """Per dataset, a JSON list of per-example records (generation: output text vs references;
    classification: answer choices, label, prediction)."""

    def __init__(self, save_dir=gin.REQUIRED):
        super().__init__(save_dir)
        self.records = []

    def batch_process(self, batch, outputs, global_hidden_dict, model):
        for i, input_str in enumerate(batch["input_str"]):
            record = {"input_str": input_str, "target_str": batch["target_str"][i]}
            if "output_text" in outputs:
                record.update(output_text=outputs["output_text"][i], references=batch["references"][i])
            if "prediction" in outputs:
                record.update(answer_choices=batch["answer_choices"][i], label=int(batch["label"][i]),
                              prediction=int(outputs["prediction"][i]),
                              multi_label=(batch.get("multi_label") or [None] * len(batch["input_str"]))[i])
            self.records.append(record)

    def dataset_process(self, dataset_name):
        with atomic_path(self.path_for(dataset_name, ".json")) as tmp:
            with open(tmp, "w") as f:
                json.dump(self.records, f, indent=1)
        self.records = []


ROUTING_FORMAT = "colm-routing-distribution/1"
# Per-module statistics of a routing file: name -> (dtype, shape: "N" per expert or "" scalar).
ROUTING_STATS = {
    "mean_probs": "mean over the tokens that count of the routing probability vector",
    "top1_counts": "number of those tokens whose most probable expert is each expert",
    "tokens": "number of those tokens",
    "mean_scores": "mean over the tokens of the pre-softmax router score vector (absent without scores)",
    "mean_score_variance": "mean over the tokens of the across-expert (biased) variance of the scores",
}
SIDE_TITLES = {"encoder": "encoder side (encoder linears, cross-attention k/v)",
               "decoder": "decoder side (decoder self-attention, cross-attention q/o, decoder FFN)"}


def _routing_entries(global_hidden_dict, kind="routing_weights"):
    """{module name: (key, value)} for every router output of this kind ("routing_weights" or the router's
    scores, Router.SCORES_KIND) in the dict."""
    return {key[2]: (key, value) for key, value in global_hidden_dict.items()
            if isinstance(key, tuple) and key[0] == kind and len(key) == 3}


def generated_token_mask(output_ids, steps, eos_id):
    """(B, steps) True for each generation step up to and including the one that produced eos."""
    produced = output_ids[:, 1 : steps + 1]
    is_eos = produced == eos_id
    return (is_eos.cumsum(dim=1) - is_eos.long()) == 0


def routed_token_values(batch, outputs, global_hidden_dict, pad_id, eos_id, kind="routing_weights", architecture=T5):
    """{module: (tokens, N) router outputs of the tokens that count}: real encoder tokens; decoder tokens of
    the predicted choice (rank classification) or of the generated text; one row per example for
    sentence-level routing. kind: "routing_weights" (probabilities) or Router.SCORES_KIND (scores). Which tokens a
    module runs on: colm.models.architecture.token_side."""
    encoder_weights = next((v for k, v in global_hidden_dict.items() if isinstance(k, tuple) and k[0] == "mask"), None)
    out = {}
    for module, (key, values) in _routing_entries(global_hidden_dict, kind).items():
        if values.dim() == 2:
            out[module] = values
            continue
        rows = values.shape[0]
        if token_side(module, architecture) == ENCODER:
            mask = encoder_weights > 0
            mask = mask.repeat_interleave(rows // mask.shape[0], dim=0)[:, -values.shape[1]:]
            out[module] = values[mask]
        elif "prediction" in outputs:
            choices = batch["answer_choices_ids"]
            b, c, t = choices.shape
            picked = torch.arange(b, device=values.device) * c + outputs["prediction"].to(values.device)
            mask = choices[torch.arange(b), outputs["prediction"].cpu()].to(values.device) != pad_id
            out[module] = values[picked][mask[:, : values.shape[1]]]
        elif "output_ids" in outputs:
            steps = torch.cat(global_hidden_dict[key + ("concatenated",)], dim=1)
            produced = generated_token_mask(outputs["output_ids"].to(steps.device), steps.shape[1], eos_id)
            out[module] = steps[:, : produced.shape[1]][produced]
    return out


def routed_token_probs(batch, outputs, global_hidden_dict, pad_id, eos_id, architecture=T5):
    """{module: (tokens, N) routing probabilities of the tokens that count} (see routed_token_values)."""
    return routed_token_values(batch, outputs, global_hidden_dict, pad_id, eos_id, "routing_weights", architecture)


def routed_token_scores(batch, outputs, global_hidden_dict, pad_id, eos_id, architecture=T5):
    """{module: (tokens, N) pre-softmax router scores of the same tokens} (routers that expose them)."""
    return routed_token_values(batch, outputs, global_hidden_dict, pad_id, eos_id, Router.SCORES_KIND, architecture)


class _ModuleRouting:
    """Running sums of one module's routing statistics (float64)."""

    def __init__(self):
        self.prob_sum = self.top1 = self.score_sum = None
        self.tokens = self.score_tokens = 0
        self.score_variance_sum = 0.0

    def add(self, probs, scores=None):
        probs = probs.detach().double().cpu()
        if self.prob_sum is None:
            self.prob_sum = torch.zeros(probs.shape[-1], dtype=torch.float64)
            self.top1 = torch.zeros(probs.shape[-1], dtype=torch.int64)
        self.prob_sum += probs.sum(dim=0)
        if probs.shape[0]:
            self.top1 += torch.bincount(probs.argmax(dim=-1), minlength=probs.shape[-1])
        self.tokens += probs.shape[0]
        if scores is not None:
            scores = scores.detach().double().cpu()
            if scores.shape != probs.shape:
                raise RuntimeError(f"router scores {tuple(scores.shape)} and probabilities {tuple(probs.shape)} "
                                   "select different tokens.")
            if self.score_sum is None:
                self.score_sum = torch.zeros(scores.shape[-1], dtype=torch.float64)
            self.score_sum += scores.sum(dim=0)
            self.score_variance_sum += float(scores.var(dim=-1, correction=0).sum()) if scores.shape[0] else 0.0
            self.score_tokens += scores.shape[0]

    def summary(self):
        n = max(self.tokens, 1)
        out = {"mean_probs": (self.prob_sum / n).numpy(), "top1_counts": self.top1.numpy(), "tokens": self.tokens}
        if self.score_sum is not None and self.score_tokens == self.tokens:
            out["mean_scores"] = (self.score_sum / n).numpy()
            out["mean_score_variance"] = self.score_variance_sum / n
        return out


def save_routing_distribution(path, dataset, modules, experts=None):
    """Writes one dataset's routing statistics ({module: summary}, see ROUTING_STATS) to a safetensors file:
    tensors `<module>/<statistic>`, metadata {format, dataset, modules (JSON list, in order), experts (JSON
    list of names, or null)}."""
    from safetensors.torch import save_file

    tensors = {}
    for module, stats in modules.items():
        tensors[f"{module}/mean_probs"] = torch.as_tensor(np.asarray(stats["mean_probs"], dtype=np.float64))
        tensors[f"{module}/top1_counts"] = torch.as_tensor(np.asarray(stats["top1_counts"], dtype=np.int64))
        tensors[f"{module}/tokens"] = torch.tensor(int(stats["tokens"]), dtype=torch.int64)
        if stats.get("mean_scores") is not None:
            tensors[f"{module}/mean_scores"] = torch.as_tensor(np.asarray(stats["mean_scores"], dtype=np.float64))
            tensors[f"{module}/mean_score_variance"] = torch.tensor(float(stats["mean_score_variance"]),
                                                                    dtype=torch.float64)
    metadata = {"format": ROUTING_FORMAT, "dataset": dataset, "modules": json.dumps(list(modules)),
                "experts": json.dumps(list(experts) if experts is not None else None)}
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)


def load_routing_distribution(path):
    """Reads a RoutingDistribution file: {"dataset": str, "experts": [names] or None, "modules": {module:
    {"mean_probs": float64 array (N), "top1_counts": int64 array (N), "tokens": int, and, when the router
    exposed scores, "mean_scores": float64 array (N), "mean_score_variance": float}}}, modules in model order."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"No routing distribution {path}: evaluate with "
                                "'P/EVALUATE/Evaluator.analysis_processors=[@RoutingDistribution()]'.")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as error:  # not a safetensors file, or truncated
        raise ValueError(f"{path} is not a readable routing distribution (safetensors): {error}") from error
    if metadata.get("format") != ROUTING_FORMAT:
        raise ValueError(f"{path}: format {metadata.get('format')!r}, expected {ROUTING_FORMAT!r} (written by "
                         "RoutingDistribution).")
    modules = {}
    for module in json.loads(metadata["modules"]):
        stats = {"mean_probs": tensors[f"{module}/mean_probs"].numpy(),
                 "top1_counts": tensors[f"{module}/top1_counts"].numpy(),
                 "tokens": int(tensors[f"{module}/tokens"])}
        if f"{module}/mean_scores" in tensors:
            stats["mean_scores"] = tensors[f"{module}/mean_scores"].numpy()
            stats["mean_score_variance"] = float(tensors[f"{module}/mean_score_variance"])
        modules[module] = stats
    return {"dataset": metadata.get("dataset"), "experts": json.loads(metadata.get("experts", "null")),
            "modules": modules}


def resolve_expert_names(expert_names, n_experts, default_file=None):
    """Expert labels (list of N strings) for plots: an explicit list, a path to an experts.json (written by
    run_concatenate beside the concatenated best.pt), or None for `default_file` when it exists. Falls back to
    "0".."N-1" (with a warning when names were given but their number is not N)."""
    names = expert_names
    if names is None and default_file and os.path.isfile(default_file):
        names = default_file
    if isinstance(names, str):
        names = [entry["name"] for entry in read_experts_file(names)]
    if names is not None and len(names) != n_experts:
        warnings.warn(f"{len(names)} expert names for {n_experts} experts; labelling experts by index instead.", stacklevel=2)
        names = None
    return [str(n) for n in names] if names is not None else [str(i) for i in range(n_experts)]


def task_by_expert(per_dataset, side, architecture=T5):
    """(datasets, matrix (datasets x N)): each dataset's routing mass per expert, averaged over the modules of
    one side ("encoder" or "decoder": the tokens they run on, colm.models.architecture.token_side); datasets
    without such modules are left out. per_dataset: {dataset: {module: {"mean_probs": ...}}}."""
    rows, names = [], []
    for dataset, modules in per_dataset.items():
        picked = [np.asarray(s["mean_probs"], dtype=np.float64) for m, s in modules.items()
                  if token_side(m, architecture) == side and s["tokens"] > 0]
        if picked:
            rows.append(np.mean(picked, axis=0))
            names.append(dataset)
    return names, (np.stack(rows) if rows else np.zeros((0, 0)))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_task_by_expert_heatmap(matrix, tasks, experts, path, title, own=None):
    """Heatmap of a tasks x experts mass matrix, experts labelled by name; `own` ({task row: expert column})
    outlines each task's own expert."""
    plt = _pyplot()
    matrix = np.asarray(matrix, dtype=np.float64)
    width = max(6.0, 0.3 * len(experts) + 3.5)
    fig, ax = plt.subplots(figsize=(width, max(3, 0.3 * len(tasks) + 2.5)))
    image = ax.imshow(matrix, aspect="auto", cmap="viridis", vmin=0)
    ax.set_xticks(range(len(experts)))
    ax.set_xticklabels(experts, rotation=90, fontsize=max(3, min(8, 600 // max(len(experts), 1))))
    ax.set_yticks(range(len(tasks)))
    ax.set_yticklabels(tasks, fontsize=max(3, min(8, 400 // max(len(tasks), 1))))
    ax.set_xlabel("expert")
    ax.set_ylabel("evaluated dataset")
    for row, column in (own or {}).items():
        ax.add_patch(plt.Rectangle((column - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.2))
    ax.set_title("\n".join(textwrap.wrap(title, int(width * 11))), fontsize=8)
    fig.colorbar(image, ax=ax, label="routing mass")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


@gin.configurable
class RoutingDistribution(AnalysisProcessor):
    """Per dataset, over the tokens that count (routed_token_probs), per module: the mean routing probability
    vector, top-1 counts, the mean pre-softmax score vector, the mean across-expert score variance and the
    token count, in `<save_dir>/<dataset>.safetensors` (read it with `load_routing_distribution`), and
    `<dataset>.png`, a heatmap of experts by module. After all datasets, `task_by_expert_encoder.png` and
    `task_by_expert_decoder.png`: datasets x experts, averaged over that side's modules.

    expert_names: labels of the experts: a list, or the path of an experts.json; None (default) reads
    `<save_dir>/../experts.json` when it exists (run_concatenate writes it beside the concatenated best.pt,
    and eval.gin puts save_dir beside best.pt), else experts are labelled by index.
    """

    def __init__(self, save_dir=gin.REQUIRED, expert_names=None):
        super().__init__(save_dir)
        self.expert_names = expert_names
        self.modules = {}
        self.results = {}

    def batch_process(self, batch, outputs, global_hidden_dict, model):
        probs = routed_token_probs(batch, outputs, global_hidden_dict, model.pad_id, model.eos_id, model.architecture)
        scores = routed_token_scores(batch, outputs, global_hidden_dict, model.pad_id, model.eos_id, model.architecture)
        for module, p in probs.items():
            self.modules.setdefault(module, _ModuleRouting()).add(p, scores.get(module))

    def names_for(self, n_experts):
        directory = expand(self.save_dir, "RoutingDistribution.save_dir")
        default = os.path.join(os.path.dirname(os.path.abspath(directory)), EXPERTS_FILE)
        return resolve_expert_names(self.expert_names, n_experts, default)

    def dataset_process(self, dataset_name):
        summaries = {m: acc.summary() for m, acc in self.modules.items() if acc.prob_sum is not None}
        self.modules = {}
        self.results[dataset_name] = summaries
        n_experts = len(next(iter(summaries.values()))["mean_probs"]) if summaries else 0
        names = self.names_for(n_experts) if summaries else []
        save_routing_distribution(self.path_for(dataset_name, ".safetensors"), dataset_name, summaries,
                                  names if summaries else None)
        if summaries:
            save_heatmap({m: s["mean_probs"] for m, s in summaries.items()}, self.path_for(dataset_name, ".png"),
                         f"Routing distribution: {dataset_name}", names)

    def cross_dataset_process(self):
        """Writes the task-by-expert summaries (TASK_BY_EXPERT_FILES) and logs them to wandb when wandb is on."""
        written = {}
        for side, file in TASK_BY_EXPERT_FILES.items():
            tasks, matrix = task_by_expert(self.results, side)
            if not tasks:
                continue
            path = os.path.join(os.path.dirname(self.path_for("x", "")), file)
            save_task_by_expert_heatmap(matrix, tasks, self.names_for(matrix.shape[1]), path,
                                        f"Routing mass by dataset, {SIDE_TITLES[side]}, mean over modules")
            written[f"routing/task_by_expert_{side}"] = path
        log_images(written)


def save_heatmap(means: dict, path: str, title: str, expert_names=None) -> None:
    """Heatmap of modules x experts (mean routing probabilities); experts labelled by name when given."""
    plt = _pyplot()
    modules = list(means)
    matrix = np.stack([np.asarray(means[m], dtype=np.float64) for m in modules])
    names = list(expert_names) if expert_names is not None else [str(i) for i in range(matrix.shape[1])]
    fig, ax = plt.subplots(figsize=(max(4, 0.3 * matrix.shape[1] + 3), max(3, 0.18 * len(modules) + 2)))
    image = ax.imshow(matrix, aspect="auto", cmap="viridis", vmin=0)
    ax.set_xlabel("expert")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=90, fontsize=max(3, min(7, 600 // max(len(names), 1))))
    ax.set_ylabel("module")
    ax.set_yticks(range(len(modules)))
    ax.set_yticklabels([m.replace(".layer.", ".").replace("block.", "") for m in modules], fontsize=5)
    ax.set_title(title, fontsize=8)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


@gin.configurable
class EntropyDistribution(AnalysisProcessor):
    """Per dataset: a histogram of routing entropies (bits) over all routed tokens and modules
    (`<save_dir>/<dataset>.png`) and the mean entropy per module (`<dataset>.json`, {module: bits})."""

    def __init__(self, save_dir=gin.REQUIRED):
        super().__init__(save_dir)
        self.entropies = {}

    def batch_process(self, batch, outputs, global_hidden_dict, model):
        routed = routed_token_probs(batch, outputs, global_hidden_dict, model.pad_id, model.eos_id, model.architecture)
        for module, probs in routed.items():
            p = probs.float().clamp_min(1e-12)
            self.entropies.setdefault(module, []).append((-(p * p.log2()).sum(dim=-1)).cpu())

    def dataset_process(self, dataset_name):
        per_module = {m: torch.cat(v) for m, v in self.entropies.items()}
        self.entropies = {}
        with atomic_path(self.path_for(dataset_name, ".json")) as tmp:
            with open(tmp, "w") as f:
                json.dump({m: float(v.mean()) if v.numel() else None for m, v in per_module.items()}, f, indent=1)
        if per_module:
            plt = _pyplot()
            fig, ax = plt.subplots(figsize=(5, 3))
            ax.hist(torch.cat(list(per_module.values())).numpy(), bins=40)
            ax.set_xlabel("routing entropy (bits)")
            ax.set_title(f"Entropy distribution: {dataset_name}", fontsize=8)
            fig.tight_layout()
            with atomic_path(self.path_for(dataset_name, ".png")) as tmp:
                fig.savefig(tmp, format="png", dpi=120)
            plt.close(fig)
