"""The size mini-language of the MoE gins: a width given as a number or read from the model.

"host_module.in_features" / "host_module.out_features": an attribute of the linear the addon sits on;
"model.d_model" (any "model.<attribute>"): an attribute of the Hugging Face model config.
"""


def resolve_size(value, host, model_config):
    """The number `value` names for an addon on `host` in a model with config `model_config`; numbers pass."""
    if isinstance(value, str):
        owner, _, attribute = value.partition(".")
        sources = {"host_module": host, "model": model_config}
        if owner not in sources or not attribute or not hasattr(sources[owner], attribute):
            raise ValueError(f"Cannot resolve size {value!r} for module {type(host).__name__}: use a number, "
                             "'host_module.<attribute>' or 'model.<config attribute>'.")
        return getattr(sources[owner], attribute)
    return value
