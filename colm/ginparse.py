"""Parsing gin files and bindings, with errors that name the culprit. Light: no model code imported."""

import difflib
import os
import re

import gin


def split_bindings(text: str) -> list:
    """Splits bindings on whitespace outside quotes and brackets.

    Launchers pass `-extra_bindings 'a=1 b="two words" c=[1, 2]'` as one argument; this gives
    ['a=1', 'b="two words"', 'c=[1, 2]'], so string values may contain spaces.
    """
    out, current, depth, quote = [], [], 0, None
    for ch in text:
        if quote:
            current.append(ch)
            if ch == quote:
                quote = None
            continue
        if ch in "\"'":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch.isspace() and depth <= 0:
            if current:
                out.append("".join(current))
                current = []
            continue
        current.append(ch)
    if quote or depth > 0:
        raise ValueError(f"Unbalanced quote or bracket in the gin bindings: {text!r}")
    if current:
        out.append("".join(current))
    # `a.b = 1` (spaces around '=', as in gin files) is one binding, not three.
    merged = []
    for piece in out:
        if merged and (piece.startswith("=") or merged[-1].endswith("=")):
            merged[-1] += " " + piece
        else:
            merged.append(piece)
    return merged


_INCLUDE = re.compile(r"""^\s*include\s+(['"])(?P<path>.+?)\1""")


def _include_exists(path: str) -> bool:
    prefixes = getattr(gin.config, "_LOCATION_PREFIXES", [""])
    return any(os.path.isfile(os.path.join(prefix, path)) for prefix in prefixes)


def check_includes(gin_files) -> None:
    """Every `include '...'` of the files (and of the files they include) must exist; gin itself fails on a
    missing one with an unrelated AttributeError."""
    seen, pending = set(), list(gin_files)
    while pending:
        file = pending.pop()
        if file in seen or not os.path.isfile(file):
            continue
        seen.add(file)
        with open(file, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                match = _INCLUDE.match(line)
                if not match:
                    continue
                included = match["path"]
                if not _include_exists(included):
                    raise FileNotFoundError(
                        f"{file}, line {number}: include '{included}': no such file (include paths are relative to "
                        f"the current directory {os.getcwd()}; run from the repository root, or fix the path).")
                pending.append(included)


def binding_scope(binding: str):
    """The scope of a binding `a/b/Configurable.param = value` ("a/b"), "" when unscoped, None for a line that is
    not a parameter binding (include, import, macro)."""
    text = binding.strip()
    if not text or text.startswith(("include", "import", "#")) or "=" not in text:
        return None
    selector = text.split("=", 1)[0].strip()
    if "." not in selector or selector.startswith("%"):
        return None
    path = selector.rsplit(".", 1)[0]
    return path.rsplit("/", 1)[0] if "/" in path else ""


def used_scopes() -> set:
    """Every scope that a configurable can run in under the parsed config: the scopes built by the registry
    (`<scope>/build.cls = @...`), the scopes of every `@scope/configurable` reference, and all their prefixes."""
    full = set()

    def walk(value):
        if isinstance(value, gin.config.ConfigurableReference):
            scopes = value.scoped_selector.split("/")[:-1]
            full.add("/".join(scopes))
        elif isinstance(value, (list, tuple, set)):
            for item in value:
                walk(item)
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)

    for (scope, selector), params in gin.config._CONFIG.items():
        if selector.split(".")[-1] == "build" and "cls" in params and scope:
            full.add(scope)
        for value in params.values():
            walk(value)
    known = {""}
    for scope in full:
        parts = scope.split("/")
        known.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    return known


def check_binding_scopes(bindings) -> None:
    """Refuses a command-line binding whose scope no configurable runs in (gin ignores it silently: with
    `P/TRIAN/Trainer.num_steps=3` the run trained its default 1000 steps)."""
    known = used_scopes()
    for binding in bindings:
        scope = binding_scope(binding)
        if scope is None or scope in known:
            continue
        hint = difflib.get_close_matches(scope, sorted(known - {""}), n=3, cutoff=0.6)
        raise ValueError(
            f"Gin binding {binding.strip()!r}: nothing runs in scope {scope!r}, so it would be ignored. "
            + (f"Did you mean {hint}? " if hint else "")
            + "Scopes are the D/<DATASET>/TRAIN|EVAL, M/MODEL, P/TRAIN, P/EVALUATE ... names of the gin files given "
            "(and the MOMA/... scopes they reference).")


def parse_gin(gin_files, gin_bindings) -> None:
    missing = [f for f in gin_files if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(
            f"Gin file(s) not found: {missing} (paths are relative to the current directory {os.getcwd()}; "
            "run from the repository root)."
        )
    check_includes(gin_files)
    bindings = split_bindings("\n".join(gin_bindings))
    gin.parse_config_files_and_bindings(gin_files, bindings)
    check_binding_scopes(bindings)
