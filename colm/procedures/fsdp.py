"""FSDP for the Trainer (`Trainer.data_parallel="fsdp"` under torchrun; docs/distributed.md): every transformer block
is an FSDP unit of its own, and what leaves the wrapped model (checkpoints, resume files, the model after
training) looks exactly as in a single process.

- Units. The blocks are the modules the architecture facts name as a whole block (colm/models/architecture.py:
  `encoder.block.3`, `model.layers.0`, `transformer.h.5`), or, for a model those facts do not cover, the classes
  transformers lists in the model's `_no_split_modules`. Each block class becomes a `ModuleWrapPolicy` entry; the
  root unit keeps the rest (embeddings, final norms, anything outside the blocks). A training step gathers the
  root unit and one block at a time (FSDP prefetches the next), so the base is never whole on a device while it
  trains. Validation and save calls during training still see every parameter whole (`full_model`), as do the
  procedures after training.
- Frozen and trainable parameters in one unit. The experts (LoRA factors, gates) live inside the base's linears,
  so every block mixes frozen and trainable parameters. FSDP1 flattens a unit into one tensor; only with
  `use_orig_params=True` may its parameters disagree on requires_grad (and the optimiser keeps the original
  parameter objects). The price: a unit's gradient buffer covers its frozen weights too, until the reduce-scatter
  leaves each rank its shard. FSDP warns about it at length for every block; that warning is replaced by one line.
- Names. Auto-wrapping puts `_fsdp_wrapped_module.` into every module path inside a block. The trainable weights
  and the optimiser state of the resume file are gathered with torch.distributed.checkpoint's full state dicts and
  written under the single-process names and indices (`trainable_state`, `optimizer_state`), so one format serves
  one process, DDP and FSDP, and each resumes the others' files. Validation and save calls during training see
  `full_model`: every parameter whole and the wrappers out of the module tree, so `state_dict()` keys and module
  names are the plain model's. `unwrap` ends FSDP for good at the end of training.
- CPU (gloo). Full state dicts are gathered without `cpu_offload`: with it (rank0_only) torch 2.13's FSDP1
  crashes (SIGSEGV) on CPU parameters. The trainable weights and their optimiser state are small (experts), so
  every rank holding a full copy for the moment of a save costs little.

torch.distributed.fsdp is imported when first used (importing it takes most of a second), so a run without FSDP
does not pay for it.
"""

import contextlib
import warnings

import torch

from colm.models import architecture

WRAPPED = "_fsdp_wrapped_module"
# FSDP's own warning for a unit whose parameters disagree on requires_grad (it lists every parameter).
MIXED_WARNING = r".*has both parameters with requires_grad=True and False.*"


def clean_name(name: str) -> str:
    """A parameter or module name without the wrappers FSDP inserted."""
    return name.replace(WRAPPED + ".", "").removesuffix("." + WRAPPED).removeprefix(WRAPPED)


def block_modules(model) -> dict:
    """{name: module} of the model's transformer blocks (see the module docstring), in module order."""
    torch_model = model.torch_model
    blocks = {name: module for name, module in torch_model.named_modules()
              if name and architecture.block_of(name, model.architecture) == name}
    if not blocks:
        kinds = set(getattr(torch_model, "_no_split_modules", None) or ())
        blocks = {name: module for name, module in torch_model.named_modules() if type(module).__name__ in kinds}
    return blocks


def _fsdp_class():
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel


def wrap(model, device, name="Trainer"):
    """(the FSDP root over colm's Model, every transformer block a unit of its own (use_orig_params), the line that
    says so)."""
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    blocks = block_modules(model)
    if not blocks:
        raise ValueError(f"{name}: data_parallel=\"fsdp\" found no transformer block in {type(model.torch_model).__name__} "
                         "(neither the architecture facts of colm/models/architecture.py nor transformers' "
                         "_no_split_modules name one), so it could only shard the model as one unit. Train with "
                         "\"ddp\", or add the architecture's block pattern.")
    classes = {type(module) for module in blocks.values()}
    mixed = sum(1 for module in blocks.values()
                if len({p.requires_grad for p in module.parameters()}) > 1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=MIXED_WARNING, category=UserWarning)
        # sync_module_states (rank 0's weights to all) needs a GPU; on CPU every rank built the same weights from
        # the same seed (and restored the same resume file) already.
        root = _fsdp_class()(model, auto_wrap_policy=ModuleWrapPolicy(classes), use_orig_params=True,
                             device_id=device, sync_module_states=device.type == "cuda")
    units = count_units(root)
    kinds = ", ".join(sorted(c.__name__ for c in classes))
    note = (f"; {mixed} of them mix frozen base weights and trainable experts, so their gradient buffers cover the "
            "frozen weights too until the reduce-scatter shards them") if mixed else ""
    return root, (f"[colm] {name}: FSDP: {units} units, {len(blocks)} transformer blocks ({kinds}) and the root "
                  f"(embeddings, final norms){note}.")


def count_units(root) -> int:
    fsdp_class = _fsdp_class()
    return sum(1 for module in root.modules() if isinstance(module, fsdp_class))


def _take_out_wrappers(torch_model) -> list:
    """Puts each inner module where its FSDP wrapper sat; returns (parent, key, wrapper) to put them back."""
    swapped, fsdp_class = [], _fsdp_class()
    for parent in list(torch_model.modules()):
        for key, child in list(parent._modules.items()):
            if isinstance(child, fsdp_class):
                swapped.append((parent, key, child))
    for parent, key, wrapper in swapped:
        parent._modules[key] = getattr(wrapper, WRAPPED)
    return swapped


def _put_back(swapped) -> None:
    for parent, key, wrapper in reversed(swapped):
        parent._modules[key] = wrapper


@contextlib.contextmanager
def full_model(root, torch_model):
    """Inside: every parameter whole on every rank (changes are written back to the shards) and the wrappers out
    of torch_model's tree, so forwards, `state_dict()` and module names are those of the plain model. A collective:
    every rank enters it."""
    with _fsdp_class().summon_full_params(root, writeback=True):
        swapped = _take_out_wrappers(torch_model)
        try:
            yield
        finally:
            _put_back(swapped)


def unwrap(root, torch_model) -> None:
    """Ends FSDP: every parameter becomes a whole tensor of its own again (a tied one, e.g. T5's embeddings, under
    all its names) and the block wrappers leave the module tree. A collective."""
    names = list(torch_model.named_parameters(remove_duplicate=False))
    whole = {}
    with _fsdp_class().summon_full_params(root, writeback=False):
        for _, param in names:
            if id(param) not in whole:
                whole[id(param)] = torch.nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad)
    # After the context: leaving it points the original parameters at their shards again.
    for name, param in names:
        owner, _, attr = name.rpartition(".")
        module = torch_model.get_submodule(owner) if owner else torch_model
        module._parameters[attr] = whole[id(param)]
    _take_out_wrappers(torch_model)


# ----- full state dicts in the single-process format -------------------------------------------------------
def _options(**extra):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=False, **extra)


def _prefix(root, torch_model) -> str:
    """The path of torch_model inside the root's state dicts ("torch_model.")."""
    for name, module in root.named_modules():
        if module is torch_model:
            return clean_name(name) + "."
    raise ValueError("the FSDP root does not hold the model's torch_model")


def _optimizer_fqns(root, optimizer) -> list:
    """The root-relative name of each parameter the optimiser steps, in its order (the single-process indices)."""
    fqns = {id(param): clean_name(name) for name, param in root.named_parameters()}
    return [fqns[id(param)] for group in optimizer.param_groups for param in group["params"]]


def trainable_state(root, model) -> dict:
    """{name: whole tensor on CPU} of every trainable parameter, named as model.named_trainable_parameters() names
    them in a single process. A collective: every rank calls it (and gets the whole tensors)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    prefix = _prefix(root, model.torch_model)
    trainable = {clean_name(n) for n, p in model.torch_model.named_parameters() if p.requires_grad}
    state = get_model_state_dict(root, options=_options(ignore_frozen_params=True))
    return {key[len(prefix):]: value.detach().cpu().clone() for key, value in state.items()
            if key.startswith(prefix) and key[len(prefix):] in trainable}


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    return value


def optimizer_state(root, optimizer) -> dict:
    """The optimiser's state dict with every state tensor whole, keyed by parameter index as
    `optimizer.state_dict()` keys it in a single process. A collective."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    fqns = _optimizer_fqns(root, optimizer)
    index = {fqn: i for i, fqn in enumerate(fqns)}
    full = get_optimizer_state_dict(root, optimizer, options=_options())
    return {
        "state": {index[fqn]: _to_cpu(value) for fqn, value in full["state"].items()},
        "param_groups": [{**group, "params": [index[fqn] for fqn in group["params"]]}
                         for group in full["param_groups"]],
    }


def load_optimizer_state(root, optimizer, state: dict) -> None:
    """Loads a single-process optimiser state dict (whole tensors, parameter indices) into the sharded optimiser:
    each rank keeps its shard. A collective; every rank passes the same dict."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    fqns = _optimizer_fqns(root, optimizer)
    if len(fqns) != sum(len(group["params"]) for group in state["param_groups"]):
        raise ValueError(f"the saved optimiser state covers {sum(len(g['params']) for g in state['param_groups'])} "
                         f"parameters, this optimiser {len(fqns)}")
    by_name = {
        "state": {fqns[i]: value for i, value in state["state"].items()},
        "param_groups": [{**group, "params": [fqns[i] for i in group["params"]]} for group in state["param_groups"]],
    }
    set_optimizer_state_dict(root, optimizer, optim_state_dict=by_name, options=_options())
