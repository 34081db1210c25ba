"""Router input means for centred routing (beyond the paper).

PHATGOOSE scores token x at a linear against expert i as <standardise(x), standardise(g_i)> / sqrt(d). Where
the tokens of a linear share one direction (decoder linears), every expert's score carries the same constant
for every token and task, and one expert wins everywhere. Centring removes it: the score becomes
<standardise(x - mu), standardise(g_i)> / sqrt(d), mu being the linear's mean input on calibration data
(colm/moma/routing.py `router_scores(input_mean=...)`; the Router does it when the checkpoint holds
`<module>._addons.router.input_mean`, see `Router.center_inputs`).

Calibration runs the model as evaluated (the concatenated MoE, its routing, the evaluation bindings) on a few
TRAIN examples of each given dataset, teacher-forced on their targets, and averages each router's input over
the tokens that count: the real (non-pad) input tokens for encoder linears and cross-attention k/v, the
decoder positions that predict a real target token (the start token and each target token fed back, up to
eos) for the other decoder linears, one row per example for sentence-level routers. The mean is taken per
dataset, then averaged over datasets (each dataset counts alike). If the input checkpoint already holds means,
its routing is centred by them while measuring; calibrating its output again refines the means.

Under torchrun each rank measures every world-th batch of each dataset and the ranks' sums and token counts are
added up (`combine_rank_sums`), so every rank gets the single process's means up to float64 rounding; rank 0
alone writes the files.

The means are written into a copy of the checkpoint (`out_path` must differ from the input; the input is
never modified), with `experts.json` copied beside it and `calibration.json` recording what was measured.

    python scripts/calibrate_routers.py --exp_name <concatenated exp> --out_path <new exp> --setting Toy

or, through the framework: colm/experiments/calibrate.gin (procedure P/CALIBRATE, class RouterCalibrator).
"""

import json
import os
import shutil

import gin
import torch

from colm.datasets.dataset import InterfaceInfo
from colm.formats import keys as K
from colm.formats.checkpoint_io import read_checkpoint, write_checkpoint
from colm.formats.layout import EXPERTS_FILE, checkpoint_file
from colm.models.architecture import ENCODER, T5, token_side
from colm.moma.moe import Router
from colm.procedures.procedure import Procedure
from colm.utils import distributed
from colm.utils.atomic import atomic_path

CALIBRATION_FILE = "calibration.json"


def input_mean_key(module: str, router_addon_name: str = K.ROUTER_ADDON) -> str:
    """Checkpoint key of a router's centring mean: `<module>._addons.router.input_mean`."""
    return f"{module}._addons.{router_addon_name}.{Router.INPUT_MEAN}"


def _token_weights(module, hidden, encoder_weights, decoder_weights, architecture=T5):
    """(rows, tokens) weights of the hidden's tokens that count, or (rows,) ones for sentence-level input."""
    if hidden.dim() == 2:
        return torch.ones(hidden.shape[0], dtype=torch.float64)
    side = token_side(module, architecture)
    weights = encoder_weights if side == ENCODER else decoder_weights
    if hidden.shape[:2] != weights.shape:
        raise RuntimeError(f"router input of {module} has shape {tuple(hidden.shape)}, which does not match the "
                           f"{side} tokens {tuple(weights.shape)}.")
    return weights


def combine_rank_sums(local):
    """[(sums, counts)] per dataset of this rank -> the same summed over every rank, on every rank.

    One gather to rank 0 and one broadcast, whatever a rank holds (a rank without batches sends empty dicts), so
    every rank makes the same collective calls. Rank 0 adds the ranks' sums in rank order (float64). In a single
    process it is `local` itself (0 + x is x, so the sums stay the bits of the unsharded loop).
    """
    shards = distributed.gather_to_main(local)
    combined = None
    if distributed.is_main():
        combined = []
        for per_rank in zip(*shards):
            sums, counts = {}, {}
            for rank_sums, rank_counts in per_rank:
                for module, total in rank_sums.items():
                    sums[module] = sums.get(module, 0) + total
                for module, count in rank_counts.items():
                    counts[module] = counts.get(module, 0) + count
            combined.append((sums, counts))
    return distributed.broadcast_from_main(combined)


def measure_router_input_means(model, datasets, num_examples=50, seed=42, router_addon_name=K.ROUTER_ADDON):
    """{router module: float32 mean input (d_router,)} and {dataset name: examples used}.

    For each dataset, `num_examples` examples drawn with `seed` (all of them if it has fewer) run teacher-forced
    through the model; see the module docstring for the tokens that count and the averaging.
    """
    routers = model.addons.get(router_addon_name, {})
    if not routers:
        raise ValueError(f"The model has no '{router_addon_name}' addons: calibration needs the MoE model (an arch gin "
                         "such as colm/models/<model_type>/moe_lora_rank16_a2.gin builds it).")
    if int(num_examples) < 1:
        raise ValueError(f"num_examples must be >= 1, got {num_examples}.")
    if not datasets:
        raise ValueError("No calibration datasets: give the TRAIN scopes of the held-in tasks, e.g. "
                         "[\"D/TOYREVERSE/TRAIN\"].")
    lm = InterfaceInfo(interface="lm")
    pad = model.pad_id
    rank, world = distributed.rank(), distributed.world_size()
    if world > 1 and distributed.is_main():
        print(f"[colm] calibration: {world} processes, rank r measures batches r, r + {world}, ... of each dataset; "
              "sums and token counts are added up over the ranks", flush=True)
    local, used = [], {}
    was_training = model.training
    model.eval()
    try:
        for dataset in datasets:
            dataset.set_tokenizer(model.tokenizer)
            if len(dataset) == 0:
                raise ValueError(f"Calibration dataset {dataset.name} has no examples.")
            order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(int(seed)))
            chosen = order[: int(num_examples)].sort().values
            sums, counts = {}, {}
            # Under torchrun each rank takes every world-th batch: the very batches (padding included) one process
            # runs, so each batch's sums are the single process's; a rank may get none.
            for chunk in chosen.split(dataset.batch_size)[rank::world]:
                batch = dataset.collate([dataset[int(i)] for i in chunk])
                with torch.no_grad():
                    model(batch, lm)
                encoder_weights = (batch["input_ids"] != pad).double()
                decoder_weights = (batch["target_ids"] != pad).double()
                for module, router in routers.items():
                    hidden = model.global_hidden_dict.get(router.read_key)
                    if hidden is None:
                        raise RuntimeError(f"The router of {module} saw no input ({router.read_key} is not in the "
                                           "model's shared dict after a forward pass).")
                    hidden = hidden.detach().double().cpu()
                    weights = _token_weights(module, hidden, encoder_weights, decoder_weights, model.architecture)
                    total = (hidden * weights.unsqueeze(-1)).reshape(-1, hidden.shape[-1]).sum(dim=0)
                    sums[module] = sums.get(module, 0) + total
                    counts[module] = counts.get(module, 0) + float(weights.sum())
            local.append((sums, counts))
            used[dataset.name] = int(chosen.numel())
    finally:
        model.train(was_training)
    per_dataset = []
    for dataset, (sums, counts) in zip(datasets, combine_rank_sums(local)):
        empty = [m for m in routers if counts.get(m, 0) == 0]
        if empty:
            raise ValueError(f"Calibration dataset {dataset.name}: no counted tokens reached {empty[:3]} (empty "
                             "targets?).")
        per_dataset.append({m: sums[m] / counts[m] for m in routers})
    means = {m: torch.stack([d[m] for d in per_dataset]).mean(dim=0).float() for m in routers}
    return means, used


def add_input_means_state(state: dict, means: dict, router_addon_name: str = K.ROUTER_ADDON) -> dict:
    """A copy of the checkpoint with `<module>._addons.router.input_mean` set for every router module.

    Refuses means for modules without router vectors in the checkpoint and router vectors without a mean
    (the model that measured them was not built for this checkpoint).
    """
    routed = {p.module for p in map(K.parse_indexed, state) if p is not None and p.is_router}
    extra = sorted(set(means) - routed)
    missing = sorted(routed - set(means))
    if extra or missing:
        raise ValueError(
            "The measured routers do not match the checkpoint's router vectors: "
            + (f"means for {len(extra)} module(s) without router vectors, e.g. {extra[:2]}; " if extra else "")
            + (f"no mean for {len(missing)} routed module(s), e.g. {missing[:2]}; " if missing else "")
            + "calibrate with the architecture the checkpoint was made for (-arch / model gin files).")
    out = dict(state)
    for module, mean in means.items():
        out[input_mean_key(module, router_addon_name)] = mean.detach().float().cpu().contiguous()
    return out


def write_calibrated_checkpoint(checkpoint: str, out_path: str, means: dict, info: dict = None) -> str:
    """Reads exp_out/<checkpoint>/best.pt, writes it with the means to exp_out/<out_path>/best.pt (never the
    same file), copies experts.json and writes calibration.json beside it. Returns the written file."""
    source = checkpoint_file(checkpoint, "RouterCalibrator.checkpoint")
    target = checkpoint_file(out_path, "RouterCalibrator.out_path")
    if os.path.abspath(source) == os.path.abspath(target):
        raise ValueError(f"RouterCalibrator.out_path={out_path!r} is the input checkpoint {source}; calibration "
                         "writes a copy: choose another out_path (e.g. \"<exp_name>_centred\").")
    state = add_input_means_state(read_checkpoint(source), means)
    write_checkpoint(state, target)
    names = os.path.join(os.path.dirname(source), EXPERTS_FILE)
    if os.path.isfile(names):
        with atomic_path(os.path.join(os.path.dirname(target), EXPERTS_FILE)) as tmp:
            shutil.copyfile(names, tmp)
    with atomic_path(os.path.join(os.path.dirname(target), CALIBRATION_FILE)) as tmp:
        with open(tmp, "w") as f:
            json.dump({"source": source, "routers": len(means), **(info or {})}, f, indent=1)
    print(f"[colm] calibration: input means of {len(means)} routers; {source} -> {target}")
    return target


@gin.configurable
class RouterCalibrator(Procedure):
    """Measures every router's mean input and writes a centred copy of the checkpoint (module docstring).

    model: the model scope (its init moma calls load `checkpoint`, as eval.gin does); datasets: TRAIN scopes;
    checkpoint / out_path: experiment paths relative to exp_out (each names <path>/best.pt);
    num_examples: examples per dataset; seed: which examples.
    """

    linking_fields = ("model", "datasets")

    def __init__(self, name, model=gin.REQUIRED, datasets=gin.REQUIRED, out_path=gin.REQUIRED,
                 checkpoint="${EXP_NAME}", num_examples=50, seed=42):
        super().__init__(name, seed)
        self.model = model
        self.datasets = [datasets] if isinstance(datasets, str) else list(datasets)
        self.out_path = out_path
        self.checkpoint = checkpoint
        self.num_examples = int(num_examples)

    def describe(self) -> str:
        return (f"RouterCalibrator: {self.num_examples} examples each of {[d.name for d in self.datasets][:8]} "
                f"-> exp_out/{self.out_path}/best.pt")

    def run(self):
        """Every rank measures its share of the batches (measure_router_input_means); rank 0 alone writes, and the
        others wait for it (the broadcast of the written path)."""
        means, used = measure_router_input_means(self.model, self.datasets, self.num_examples, self.seed)
        target = None
        if distributed.is_main():
            target = write_calibrated_checkpoint(self.checkpoint, self.out_path, means,
                                                 {"examples": used, "seed": self.seed})
        return distributed.broadcast_from_main(target)
