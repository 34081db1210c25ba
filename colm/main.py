"""Entry point: `python -m colm.main --gin_files F1 F2 ... --gin_bindings B1 B2 ...`.

Files are parsed in order, then bindings (later wins). `main.procedure_exec_order` names the procedures
(`P/...` scopes) to build and run, in order; the same name twice is the same object run twice.
"""

import argparse
import os
import sys

import gin

from colm import (
    configurables,  # noqa: F401  (registers every gin configurable)
    registry,
)
from colm.utils.logging import setup_logger
from colm.utils.paths import expand
from colm.utils.seed import set_seeds


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
    return out


def parse_gin(gin_files, gin_bindings) -> None:
    missing = [f for f in gin_files if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(
            f"Gin file(s) not found: {missing} (paths are relative to the current directory {os.getcwd()}; "
            "run from the repository root)."
        )
    bindings = split_bindings("\n".join(gin_bindings))
    gin.parse_config_files_and_bindings(gin_files, bindings)


@gin.configurable
def main(exp_name="debug", procedure_exec_order=(), global_seed=None, logging_backend=None):
    exp_name = expand(exp_name, "main.exp_name")
    # Output paths in the gin files use ${EXP_NAME}; a direct call with main.exp_name=... must work too.
    os.environ.setdefault("EXP_NAME", exp_name)
    if global_seed is not None:
        set_seeds(global_seed)
    setup_logger(logging_backend, exp_name)
    procedures = [registry.get_object(name) for name in procedure_exec_order]
    if not procedures:
        print("[colm] main.procedure_exec_order is empty: nothing to run.")
    for name, procedure in zip(procedure_exec_order, procedures):
        print(f"[colm] {name}: {procedure.describe()}")
    for procedure in procedures:
        procedure.run_in_scope()
    return procedures


def cli(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gin_files", nargs="+", default=[])
    parser.add_argument("--gin_bindings", nargs="*", default=[])
    args = parser.parse_args(argv)
    parse_gin(args.gin_files, args.gin_bindings)
    main()


if __name__ == "__main__":
    sys.exit(cli())
