"""Parsing gin files and bindings, with errors that name the culprit. Light: no model code imported."""

import os

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


def parse_gin(gin_files, gin_bindings) -> None:
    missing = [f for f in gin_files if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(
            f"Gin file(s) not found: {missing} (paths are relative to the current directory {os.getcwd()}; "
            "run from the repository root)."
        )
    bindings = split_bindings("\n".join(gin_bindings))
    gin.parse_config_files_and_bindings(gin_files, bindings)
