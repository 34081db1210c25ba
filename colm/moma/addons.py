"""Addons: small nn.Modules hosted on a submodule of the model, run around its forward.

An addon lives in `host._addons[<addon name>]`, so its parameters appear in the state dict as
`<host path>._addons.<addon name>.<param>` (the original's key layout). The host keeps its own class;
one forward pre-hook and one forward hook (with kwargs) per host call the addons in their order.

Addons talk to each other through the model's `global_hidden_dict` (cleared at every model call):
ExposeHidden writes a module's input there, a Router reads it and writes routing weights, experts read
those. Keys are tuples `(kind, addon_name, module_name[, extra])`.

Insertion order: "first" (pre at front, post at front), "last" (pre at end, post at end),
"inner" (pre at end, post at front), "outer" (pre at front, post at end).
"""

from torch import nn

ORDERS = ("first", "last", "inner", "outer")


class Addon(nn.Module):
    """Base class. Override `pre_forward` and/or `post_forward`.

    pre_forward(args, kwargs) may return None or new (args, kwargs);
    post_forward(args, kwargs, output) may return None or a new output.
    """

    has_pre_forward = False
    has_post_forward = False

    def __init__(self, global_hidden_dict, host_name):
        super().__init__()
        # A plain attribute (not a submodule or buffer): shared by every addon of the model.
        self.global_hidden_dict = global_hidden_dict
        self.host_name = host_name

    def pre_forward(self, args, kwargs):
        return None

    def post_forward(self, args, kwargs, output):
        return None

    def prepare_load(self, prefix, state_dict):
        """Called before a state dict is loaded; lets an addon create parameters the checkpoint holds."""


def _run_pre_addons(host, args, kwargs):
    for name in host._addon_pre_order:
        result = host._addons[name].pre_forward(args, kwargs)
        if result is not None:
            args, kwargs = result
    return args, kwargs


def _run_post_addons(host, args, kwargs, output):
    for name in host._addon_post_order:
        result = host._addons[name].post_forward(args, kwargs, output)
        if result is not None:
            output = result
    return output


def _make_host(module: nn.Module) -> None:
    if hasattr(module, "_addons"):
        return
    module.add_module("_addons", nn.ModuleDict())
    module._addon_pre_order = []
    module._addon_post_order = []
    module.register_forward_pre_hook(_run_pre_addons, with_kwargs=True)
    module.register_forward_hook(_run_post_addons, with_kwargs=True)


def insert_addon(host: nn.Module, addon_name: str, addon: Addon, order: str = "last") -> None:
    if order not in ORDERS:
        raise ValueError(f"Addon order {order!r} is not one of {ORDERS}.")
    if hasattr(nn.ModuleDict, addon_name):
        raise ValueError(f"Addon name {addon_name!r} clashes with an nn.Module attribute; choose another name.")
    _make_host(host)
    if addon_name in host._addons:
        raise ValueError(f"Module {addon.host_name!r} already hosts an addon named {addon_name!r}.")
    host._addons[addon_name] = addon
    pre_front = order in ("first", "outer")
    post_front = order in ("first", "inner")
    if addon.has_pre_forward:
        host._addon_pre_order.insert(0 if pre_front else len(host._addon_pre_order), addon_name)
    if addon.has_post_forward:
        host._addon_post_order.insert(0 if post_front else len(host._addon_post_order), addon_name)


def get_addon(host: nn.Module, addon_name: str):
    addons = getattr(host, "_addons", None)
    return addons[addon_name] if addons is not None and addon_name in addons else None
