"""Strict coercion of gin and launcher values.

Launchers pass booleans as the strings "True"/"False" (and users type "true"), and gin passes Python values;
the original read the string "False" as true. Every boolean parameter goes through `as_bool`; a value that is
not clearly a boolean is an error naming the parameter, never a silent False.
"""

_WORDS = {"true": True, "false": False}


def as_bool(value, what: str) -> bool:
    """True/False from a bool or the strings "True"/"False" (any case, surrounding spaces ignored)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _WORDS:
        return _WORDS[value.strip().lower()]
    raise ValueError(f"{what} must be True or False, got {value!r}.")


def as_optional_bool(value, what: str):
    """Like as_bool, but None (or the string "None") stays None: for parameters where None means 'decide for me'."""
    if value is None or (isinstance(value, str) and value.strip() == "None"):
        return None
    return as_bool(value, what)
