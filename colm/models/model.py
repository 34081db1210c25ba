"""Model: an HF model plus tokenizer, mutated by moma calls, run through an interface per batch.

Construction: the init moma calls run in order (install addons, LoRA, load weights; see `moma_calls`), then
trainable parameters are set, then the model moves to its device. `model(batch, interface_info)` clears the shared
`global_hidden_dict`, moves the batch, and dispatches to lm / gen / mc (colm/models/interfaces.py).
"""

import contextlib
import re

import gin
import torch
from torch import nn

from colm.datasets.dataset import special_ids
from colm.models import architecture, interfaces, module_names
from colm.models.hf_loading import conv1d_as_linear
from colm.moma.addons import get_addon, insert_addon

PRECISIONS = {None: None, "None": None, "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@gin.configurable
def moma_calls(build=(), experts=()):
    """`Model.init_moma_calls = @M/MODEL/moma_calls()` in two parts: `build`, what the model gin installs (LoRA, or
    the MoE's hidden watchers, routers and experts), then `experts`, where the experts come from (load_weights in
    eval.gin, extend_moe in train_single_task.gin). So a model gin owns its build list, an experiment adds the rest,
    and neither file needs to come after the other. Binding Model.init_moma_calls to a list replaces both."""
    return list(build) + list(experts)


@gin.configurable
class Model(nn.Module):
    def __init__(self, name, torch_model=gin.REQUIRED, tokenizer=gin.REQUIRED, trainable_params="all",
                 mix_precision=None, device="auto", init_moma_calls=(), pass_batch_input=False):
        super().__init__()
        self.name = name
        self.torch_model = torch_model
        self.tokenizer = tokenizer
        self.architecture = module_names.architecture_of(torch_model)
        if architecture.facts(self.architecture).conv1d_linears:
            conv1d_as_linear(torch_model)  # GPT-2: its Conv1D linears become nn.Linear before any addon is installed
        self.interfaces = interfaces.for_architecture(self.architecture)
        self.pad_id = tokenizer.pad_token_id
        self.bos_id, self.eos_id = special_ids(tokenizer)
        self.pass_batch_input = pass_batch_input
        self.global_hidden_dict = {}
        self.addons = {}  # addon name -> {module name: addon}
        self.global_step = 0
        if mix_precision not in PRECISIONS:
            raise ValueError(f"Model.mix_precision={mix_precision!r}; choose one of None, 'bf16', 'fp16'.")
        self.compute_dtype = PRECISIONS[mix_precision]
        # What will be trainable, for loads during the init calls (colm/moma/weights.py check_missing).
        self.requested_trainable_params = trainable_params
        for call in init_moma_calls:
            call(self)
        self.set_trainable_params(trainable_params)
        self.device = self._pick_device(device)
        self.torch_model.to(self.device)

    # ----- module lookup and addons -------------------------------------------------------------
    def to_regex(self, pattern) -> str:
        return module_names.to_regex(pattern, self.architecture)

    def match_modules(self, pattern) -> dict:
        return module_names.match_modules(self.torch_model, pattern, self.architecture)

    def module(self, name: str) -> nn.Module:
        return self.torch_model.get_submodule(name) if name else self.torch_model

    def token_side(self, module_name: str) -> str:
        """The tokens a module runs on, "encoder" or "decoder" (colm/models/architecture.py): what moma asks the
        model instead of reading module names itself."""
        return architecture.token_side(module_name, self.architecture)

    def insert_addon(self, module_name, addon_name, addon, order="last"):
        insert_addon(self.module(module_name), addon_name, addon, order)
        self.addons.setdefault(addon_name, {})[module_name] = addon

    def get_addon(self, module_name, addon_name):
        return get_addon(self.module(module_name), addon_name)

    def prepare_load(self, state_dict):
        """Gives every addon the chance to create what a checkpoint holds (e.g. experts) before loading."""
        for name, module in self.torch_model.named_modules():
            for addon_name, addon in getattr(module, "_addons", {}).items():
                addon.prepare_load(f"{name}._addons.{addon_name}." if name else f"_addons.{addon_name}.", state_dict)

    def after_load(self):
        """Parameters a checkpoint created (experts) get the trainable flags, precision and device of the rest."""
        if hasattr(self, "trainable_params"):  # during __init__ this runs later anyway
            self.set_trainable_params(self.trainable_params)
        if hasattr(self, "device"):
            self.torch_model.to(self.device)

    # ----- parameters, precision, device --------------------------------------------------------
    def set_trainable_params(self, trainable_params):
        self.trainable_params = trainable_params
        regex = re.compile(self.to_regex(trainable_params))
        for name, param in self.torch_model.named_parameters():
            param.requires_grad_(bool(regex.fullmatch(name)))
            # Frozen weights may live in low precision; trainable ones stay fp32 for the optimiser.
            if self.compute_dtype is not None and not param.requires_grad and param.dtype == torch.float32:
                param.data = param.data.to(self.compute_dtype)

    def named_trainable_parameters(self):
        return [(n, p) for n, p in self.torch_model.named_parameters() if p.requires_grad]

    @staticmethod
    def _pick_device(device):
        if device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(device)

    def autocast(self):
        if self.compute_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.compute_dtype)

    # ----- running ------------------------------------------------------------------------------
    def forward(self, batch, interface_info, passing_global_hiddens=None):
        self.global_hidden_dict.clear()
        if passing_global_hiddens:
            self.global_hidden_dict.update(passing_global_hiddens)
        if self.pass_batch_input:
            self.global_hidden_dict["batch_input"] = batch
        batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        if interface_info.interface not in self.interfaces:
            raise ValueError(f"Interface {interface_info.interface!r} is not one of {sorted(self.interfaces)}.")
        with self.autocast():
            output = self.interfaces[interface_info.interface](self, batch, interface_info)
        if "loss" in output:
            for key, value in self.global_hidden_dict.items():
                if isinstance(key, tuple) and key[0] == "loss":
                    output["loss"] = output["loss"] + (torch.stack(value).mean() if isinstance(value, list) else value)
        return output

    def describe(self) -> str:
        total = sum(p.numel() for p in self.torch_model.parameters())
        trainable = sum(p.numel() for _, p in self.named_trainable_parameters())
        addons = {name: len(hosts) for name, hosts in self.addons.items()}
        return f"Model {self.name}: {total:,} parameters, {trainable:,} trainable, addons {addons}, device {self.device}"
