"""Average Activation (spec 4.8.3): the average input activation of every linear, per dataset.

The router vector of expert i at linear m is the average, over up to 1000 TRAIN examples of dataset i, of
the example-pooled input of m, computed with expert i applied (its one-expert checkpoint loaded: the
routing weight is 1). Pooling per example:
- encoder linears: the mean over the example's real (non-pad) tokens;
- cross-attention k / v: the same, over the encoder tokens (their input is the encoder output);
- every other decoder linear: the mean over all decoder tokens the model processes for the example during
  generation: the start token and each generated token fed back, up to and including the step that produced
  eos (steps after that only feed padding and are left out). With `decoder_last_step_only=True` it is the
  original's quirk instead: only the activation of the batch's last generation step (a padding step for
  examples that finished earlier), because the original overwrote the stored activation at every step.
The vector is then the mean over examples. `encoder.final_layer_norm` (its output, pooled like an encoder
linear) is recorded too: it is the router input of the A1 decoder router.

Run it through the evaluation path on a TRAIN split with the "gen" interface (reinit_router_embedding.sh
does): `P/EVALUATE/Evaluator.analysis_processors = [@SaveAveragedHiddens()]`. Writes
`<save_dir>/<dataset with / -> _>.safetensors` = {module name: float32 vector} (safetensors: loading it runs no
code, unlike the original's pickle).

Under torchrun the Evaluator runs its analysis processors on rank 0 alone (colm/procedures/evaluator.py): rank 0
evaluates every batch of the dataset and writes the file once, the other ranks wait for its scores; the file is
the single process's.
"""

import gin
import torch
from safetensors.torch import save_file

from colm.formats.layout import HIDDENS_EXTENSION
from colm.models.architecture import ENCODER, a1_router_input, token_side
from colm.moma.moe import expert_count
from colm.procedures.analysis import AnalysisProcessor, generated_token_mask
from colm.utils import distributed
from colm.utils.atomic import atomic_path
from colm.utils.coerce import as_bool


def decoder_token_weights(output_ids, eos_id, last_step_only=False):
    """(B, steps) 0/1 weights of the decoder positions that count; step t is fed output_ids[:, t].

    A step counts until the example has produced eos (the eos-producing step included); afterwards
    generation feeds it padding. last_step_only: only the batch's final step, for every example.
    """
    steps = output_ids.shape[1] - 1  # the last generated token is never fed back
    weights = torch.ones(output_ids.shape[0], steps, device=output_ids.device)
    if last_step_only:
        weights[:, :-1] = 0
    elif eos_id is not None:
        weights = generated_token_mask(output_ids, steps, eos_id).float()
    return weights


def pooled(hidden, weights):
    """Per-example weighted mean over tokens, in float32: (B, L, d), (B, L) -> (B, d)."""
    if hidden.shape[:2] != weights.shape:
        raise RuntimeError(f"activation of shape {tuple(hidden.shape)} does not match the token weights "
                           f"{tuple(weights.shape)}")
    weights = weights / weights.sum(dim=1, keepdim=True)
    # Elementwise rather than a matmul: the hooks run under the model's autocast, which would do it in bf16.
    return (hidden.float() * weights[..., None]).sum(dim=1)


@gin.configurable
class SaveAveragedHiddens(AnalysisProcessor):
    """Per dataset, {module: mean over examples of the module's example-pooled input} (module docstring).

    The evaluated batch is replayed once, teacher-forced on the generated tokens, with forward hooks on the
    watched modules: a causal decoder computes at each position exactly what generation computed at that
    step with its KV cache, and the hooks see every position at once instead of one step per call.

    modules: module-name pattern(s) whose inputs are averaged (default: every encoder and decoder linear).
    decoder_last_step_only: reproduce the original (only the batch's last generation step for decoder
      linears other than cross-attention k / v).
    """

    def __init__(self, save_dir=gin.REQUIRED, modules=("encoder_linear", "decoder_linear"),
                 decoder_last_step_only=False):
        super().__init__(save_dir)
        self.modules = list(modules) if isinstance(modules, (list, tuple)) else [modules]
        self.decoder_last_step_only = as_bool(decoder_last_step_only, "SaveAveragedHiddens.decoder_last_step_only")
        self.sums, self.num_examples = {}, 0

    def batch_process(self, batch, outputs, global_hidden_dict, model):
        if "output_ids" not in outputs:
            raise ValueError(
                "SaveAveragedHiddens averages over generated decoder tokens: evaluate the dataset with the 'gen' "
                "interface (D/<dataset>/TRAIN/InterfaceInfo.interface=\"gen\"), as reinit_router_embedding.sh does."
            )
        experts = expert_count(model)
        if experts not in (1, []):  # [] : no MoE at all (e.g. a plain LoRA or the base model)
            raise ValueError(
                f"SaveAveragedHiddens: the model has {experts} experts per router; average activations are taken "
                "with one expert applied at weight 1. Load a one-expert checkpoint (datasets_concatenated/"
                "<name>_<suffix>), not a concatenated one."
            )
        input_ids = batch["input_ids"].to(model.device)
        output_ids = outputs["output_ids"].to(model.device)
        encoder_weights = (input_ids != model.pad_id).float()
        decoder_weights = decoder_token_weights(output_ids, model.eos_id, self.decoder_last_step_only)

        def add(name, hidden):
            weights = encoder_weights if token_side(name, model.architecture) == ENCODER else decoder_weights
            try:
                per_example = pooled(hidden, weights)
            except RuntimeError as error:
                raise RuntimeError(f"SaveAveragedHiddens, module {name}: {error}.") from error
            self.sums[name] = self.sums.get(name, 0) + per_example.sum(dim=0).double()

        watched = model.match_modules(self.modules)
        if not watched:
            raise ValueError(f"SaveAveragedHiddens.modules={self.modules!r} matches no module of the model.")
        handles = [module.register_forward_pre_hook(
            lambda m, args, kwargs, name=name: add(name, args[0] if args else kwargs["input"]), with_kwargs=True)
            for name, module in watched.items()]
        handles += [module.register_forward_hook(lambda m, args, out, name=name: add(name, out))
                    for name, module in model.match_modules(f'"{a1_router_input(model.architecture)}"').items()]
        # The replay overwrites the shared dict; later analysis processors must still see the evaluated batch.
        saved = dict(global_hidden_dict)
        try:
            with torch.no_grad(), model.autocast():
                model.torch_model(input_ids=input_ids, attention_mask=encoder_weights.long(),
                                  decoder_input_ids=output_ids[:, :-1])
        finally:
            for handle in handles:
                handle.remove()
            global_hidden_dict.clear()
            global_hidden_dict.update(saved)
        self.num_examples += input_ids.shape[0]

    def dataset_process(self, dataset_name):
        if self.num_examples == 0:
            raise ValueError(f"SaveAveragedHiddens: dataset {dataset_name} had no examples to average over.")
        means = {name: (total / self.num_examples).float().cpu().contiguous() for name, total in self.sums.items()}
        self.sums, self.num_examples = {}, 0
        path = self.path_for(dataset_name, HIDDENS_EXTENSION)
        with atomic_path(path) as tmp:
            save_file(means, tmp, metadata={"format": "colm averaged hiddens", "dataset": dataset_name})
        alone = (f" (rank 0 of {distributed.world_size()} averaged every batch alone; the other ranks waited)"
                 if distributed.is_distributed() else "")
        print(f"[colm] SaveAveragedHiddens: {len(means)} module averages -> {path}{alone}", flush=True)
