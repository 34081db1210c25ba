"""The object registry: every dataset, model and procedure is a gin scope (`D/...`, `M/...`, `P/...`).

`get_object("D/TOYREVERSE/EVAL")` enters that scope and calls `build`, whose `cls` comes from a binding
such as `D/TOYREVERSE/EVAL/build.cls = @ToyDataset`, so every binding made at `D/`, `D/TOYREVERSE/` and
`D/TOYREVERSE/EVAL/` applies. Objects are cached by name: naming a scope twice gives the same object.
Procedures then `link()` the scope names they hold (model, datasets, ...) into built objects.
"""

import gin

from colm.utils.paths import expand

SCOPE_PREFIXES = ("D/", "M/", "P/")
_OBJECTS: dict = {}


@gin.configurable
def build(cls=gin.REQUIRED, name=None):
    return cls(name=name)


def reset() -> None:
    """Forgets every built object (tests and repeated `main` calls in one process)."""
    _OBJECTS.clear()


def known_scopes() -> list:
    """Every scope that has a `build.cls` binding in the parsed config."""
    scopes = []
    for (scope, selector), params in gin.config._CONFIG.items():
        if selector.split(".")[-1] == "build" and "cls" in params and scope:
            scopes.append(scope)
    return sorted(scopes)


def _closest(name: str, candidates: list, n: int = 5) -> list:
    import difflib

    return difflib.get_close_matches(name, candidates, n=n, cutoff=0.5)


def get_object(name: str):
    name = expand(name, "scope name")
    if name in _OBJECTS:
        return _OBJECTS[name]
    if not name.startswith(SCOPE_PREFIXES):
        raise ValueError(f"Scope name {name!r} must start with one of {SCOPE_PREFIXES} (data, model, procedure).")
    scopes = known_scopes()
    if name not in scopes:
        hint = _closest(name, scopes)
        raise ValueError(
            f"Unknown scope {name!r}: no binding '{name}/build.cls = @...' in the gin files given. "
            + (f"Did you mean {hint}? " if hint else "")
            + "Check the dataset name (-dataset) and that the registry gin file defining it is passed."
        )
    components = name.split("/")
    with gin.config_scope(components):
        obj = build(name=name)
    _OBJECTS[name] = obj
    if hasattr(obj, "link"):
        obj.link()
        with gin.config_scope(components):
            obj.late_init()
    return obj


def link_field(value):
    """Turns a scope name, or a list/dict of them, into built objects."""
    if isinstance(value, str):
        return get_object(value)
    if isinstance(value, (list, tuple)):
        return [link_field(v) for v in value]
    if isinstance(value, dict):
        return {k: link_field(v) for k, v in value.items()}
    return value
