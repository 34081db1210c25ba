"""Analysis processors: given every evaluated batch, write something per dataset."""

import json
import os
import pickle

import gin
import numpy as np
import torch

from colm.utils.atomic import atomic_path
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
        return os.path.join(directory, dataset_name.replace("/", "_") + suffix)


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


def _routing_entries(global_hidden_dict):
    """{module name: routing probabilities} for every router output in the dict."""
    return {key[2]: (key, value) for key, value in global_hidden_dict.items()
            if isinstance(key, tuple) and key[0] == "routing_weights" and len(key) == 3}


def encoder_side(module_name):
    """Modules whose tokens are encoder tokens: encoder linears and cross-attention k/v."""
    return module_name.startswith("encoder") or module_name.endswith(("EncDecAttention.k", "EncDecAttention.v"))


def generated_token_mask(output_ids, steps, eos_id):
    """(B, steps) True for each generation step up to and including the one that produced eos."""
    produced = output_ids[:, 1 : steps + 1]
    is_eos = produced == eos_id
    return (is_eos.cumsum(dim=1) - is_eos.long()) == 0


def routed_token_probs(batch, outputs, global_hidden_dict, pad_id, eos_id):
    """{module: (tokens, N) probabilities of the tokens that count}: real encoder tokens; decoder tokens of
    the predicted choice (rank classification) or of the generated text; one row per example for
    sentence-level routing."""
    encoder_weights = next((v for k, v in global_hidden_dict.items() if isinstance(k, tuple) and k[0] == "mask"), None)
    out = {}
    for module, (key, probs) in _routing_entries(global_hidden_dict).items():
        if probs.dim() == 2:
            out[module] = probs
            continue
        rows = probs.shape[0]
        if encoder_side(module):
            mask = encoder_weights > 0
            mask = mask.repeat_interleave(rows // mask.shape[0], dim=0)[:, -probs.shape[1]:]
            out[module] = probs[mask]
        elif "prediction" in outputs:
            choices = batch["answer_choices_ids"]
            b, c, t = choices.shape
            picked = torch.arange(b, device=probs.device) * c + outputs["prediction"].to(probs.device)
            mask = choices[torch.arange(b), outputs["prediction"].cpu()].to(probs.device) != pad_id
            out[module] = probs[picked][mask[:, : probs.shape[1]]]
        elif "output_ids" in outputs:
            steps = torch.cat(global_hidden_dict[key + ("concatenated",)], dim=1)
            produced = generated_token_mask(outputs["output_ids"].to(steps.device), steps.shape[1], eos_id)
            out[module] = steps[:, : produced.shape[1]][produced]
    return out


@gin.configurable
class RoutingDistribution(AnalysisProcessor):
    """Per dataset: `<save_dir>/<dataset>.pickle` = {module: mean routing probability vector (N)} over the
    tokens that count, and `<dataset>.png`, a heatmap of experts by module."""

    def __init__(self, save_dir=gin.REQUIRED):
        super().__init__(save_dir)
        self.sums, self.counts, self.results = {}, {}, {}

    def batch_process(self, batch, outputs, global_hidden_dict, model):
        for module, probs in routed_token_probs(batch, outputs, global_hidden_dict, model.pad_id, model.eos_id).items():
            self.sums[module] = self.sums.get(module, 0) + probs.float().sum(dim=0).cpu()
            self.counts[module] = self.counts.get(module, 0) + probs.shape[0]

    def dataset_process(self, dataset_name):
        means = {m: (self.sums[m] / max(self.counts[m], 1)).numpy() for m in self.sums}
        self.sums, self.counts = {}, {}
        self.results[dataset_name] = means
        with atomic_path(self.path_for(dataset_name, ".pickle")) as tmp:
            with open(tmp, "wb") as f:
                pickle.dump(means, f)
        if means:
            save_heatmap(means, self.path_for(dataset_name, ".png"), f"Routing distribution: {dataset_name}")


def save_heatmap(means: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modules = list(means)
    matrix = np.stack([means[m] for m in modules])
    fig, ax = plt.subplots(figsize=(max(4, 0.35 * matrix.shape[1] + 3), max(3, 0.18 * len(modules) + 1.5)))
    image = ax.imshow(matrix, aspect="auto", cmap="viridis", vmin=0)
    ax.set_xlabel("expert")
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
    (`<save_dir>/<dataset>.png`) and the mean entropy per module (`<dataset>.pickle`)."""

    def __init__(self, save_dir=gin.REQUIRED):
        super().__init__(save_dir)
        self.entropies = {}

    def batch_process(self, batch, outputs, global_hidden_dict, model):
        for module, probs in routed_token_probs(batch, outputs, global_hidden_dict, model.pad_id, model.eos_id).items():
            p = probs.float().clamp_min(1e-12)
            self.entropies.setdefault(module, []).append((-(p * p.log2()).sum(dim=-1)).cpu())

    def dataset_process(self, dataset_name):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        per_module = {m: torch.cat(v) for m, v in self.entropies.items()}
        self.entropies = {}
        with atomic_path(self.path_for(dataset_name, ".pickle")) as tmp:
            with open(tmp, "wb") as f:
                pickle.dump({m: float(v.mean()) for m, v in per_module.items()}, f)
        if per_module:
            fig, ax = plt.subplots(figsize=(5, 3))
            ax.hist(torch.cat(list(per_module.values())).numpy(), bins=40)
            ax.set_xlabel("routing entropy (bits)")
            ax.set_title(f"Entropy distribution: {dataset_name}", fontsize=8)
            fig.tight_layout()
            with atomic_path(self.path_for(dataset_name, ".png")) as tmp:
                fig.savefig(tmp, format="png", dpi=120)
            plt.close(fig)
