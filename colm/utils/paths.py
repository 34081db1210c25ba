"""Environment-variable expansion for names and paths taken from gin (`exp_out/${EXP_NAME}/best.pt`)."""

import os
import re

_UNEXPANDED = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?")


def expand(value: str, what: str = "value") -> str:
    """Expands `${VAR}` and fails, naming the variable, if one is left unset."""
    expanded = os.path.expandvars(value)
    left = _UNEXPANDED.search(expanded)
    if left:
        raise ValueError(
            f"{what} {value!r} uses the environment variable {left.group(1)}, which is not set. "
            f"The launchers set EXP_NAME (and the gin files pass DATASET/OLD_EXP_NAME as bindings); "
            f"export {left.group(1)}=... or bind the value explicitly."
        )
    return expanded
