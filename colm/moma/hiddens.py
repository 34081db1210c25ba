"""Exposing activations for routers: PrepareMask (encoder attention mask) and ExposeHidden.

`watch_hiddens` installs one PrepareMask on the encoder and an ExposeHidden on every module matching a
pattern. ExposeHidden writes the module's input (position "before") or output ("after") under
("hidden_states", <addon name>, <module name>), reduced per example or kept per token.
"""

import gin
import torch

from colm.moma.addons import Addon

REDUCTIONS = (None, "mean", "masked_mean", "masked_select")


class PrepareMask(Addon):
    """Pre-forward on the encoder: stores per-token averaging weights (mask / number of real tokens)."""

    has_pre_forward = True

    def __init__(self, global_hidden_dict, host_name, key):
        super().__init__(global_hidden_dict, host_name)
        self.key = key

    def pre_forward(self, args, kwargs):
        mask = kwargs.get("attention_mask")
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if mask is None:
            if input_ids is None:
                raise ValueError("PrepareMask needs the encoder to be called with input_ids or attention_mask.")
            mask = torch.ones(input_ids.shape[:2], device=input_ids.device)
        mask = mask.float()
        self.global_hidden_dict[self.key] = mask / (mask.sum(dim=1, keepdim=True) + 1e-6)
        return None


@gin.configurable
class ExposeHidden(Addon):
    def __init__(self, global_hidden_dict, host_name, write_key, mask_key,
                 reduction_method="masked_mean", position="before"):
        super().__init__(global_hidden_dict, host_name)
        if reduction_method in ("None", "none"):
            reduction_method = None
        if reduction_method not in REDUCTIONS:
            raise ValueError(f"ExposeHidden.reduction_method={reduction_method!r}; choose one of {REDUCTIONS}.")
        if position not in ("before", "after"):
            raise ValueError(f"ExposeHidden.position={position!r}; choose 'before' or 'after'.")
        self.write_key, self.mask_key = write_key, mask_key
        self.reduction_method, self.position = reduction_method, position
        self.has_pre_forward = position == "before"
        self.has_post_forward = position == "after"

    def _mask_for(self, hidden):
        mask = self.global_hidden_dict[self.mask_key].to(hidden.dtype)
        rows = hidden.shape[0]
        if mask.shape[0] != rows:  # rank classification repeats each example once per answer choice
            mask = mask.repeat_interleave(rows // mask.shape[0], dim=0)
        return mask[:, -hidden.shape[1]:]

    def reduce(self, hidden):
        if self.reduction_method is None:
            return hidden
        if self.reduction_method == "mean":
            return hidden.mean(dim=1)
        mask = self._mask_for(hidden)
        if self.reduction_method == "masked_mean":
            return torch.einsum("bld,bl->bd", hidden, mask)
        return hidden[mask > 0]  # masked_select: only real tokens, flattened

    def pre_forward(self, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        self.global_hidden_dict[self.write_key] = self.reduce(hidden)
        return None

    def post_forward(self, args, kwargs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        self.global_hidden_dict[self.write_key] = self.reduce(hidden)
        return None


@gin.configurable
def watch_hiddens(model, prepare_mask_modules="encoder", expose_hidden_modules=gin.REQUIRED,
                  prepare_mask_addon_name="prepare_mask", expose_hiddens_addon_name="expose_hiddens"):
    hosts = model.match_modules(prepare_mask_modules)
    if len(hosts) != 1:
        raise ValueError(
            f"watch_hiddens: prepare_mask_modules={prepare_mask_modules!r} must match exactly one module, "
            f"matched {sorted(hosts)}."
        )
    (mask_host_name,) = hosts
    mask_key = ("mask", prepare_mask_addon_name, mask_host_name)
    if model.get_addon(mask_host_name, prepare_mask_addon_name) is None:
        model.insert_addon(mask_host_name, prepare_mask_addon_name,
                           PrepareMask(model.global_hidden_dict, mask_host_name, mask_key), order="first")
    targets = model.match_modules(expose_hidden_modules)
    if not targets:
        raise ValueError(f"watch_hiddens: expose_hidden_modules={expose_hidden_modules!r} matches no module.")
    for name in targets:
        if model.get_addon(name, expose_hiddens_addon_name) is not None:
            continue
        key = ("hidden_states", expose_hiddens_addon_name, name)
        model.insert_addon(name, expose_hiddens_addon_name,
                           ExposeHidden(model.global_hidden_dict, name, key, mask_key), order="last")
