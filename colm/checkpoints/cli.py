"""Command lines over the checkpoint library: `func_caller.func=@<function>` picks what runs.

    python scripts/manipulations.py --gin_bindings 'func_caller.func=@put_index_to_lora' \
        'put_index_to_lora.path="P3Socialiqa_t5xl_lora"' \
        'put_index_to_lora.out_path="datasets_concatenated/P3Socialiqa_t5xl_lora"'
"""

import argparse
import sys

import gin

# Every module with gin-configurable checkpoint functions, so that func_caller.func=@<function> resolves.
from colm.checkpoints import (  # noqa: F401
    blocks,
    concatenate,
    decoder_router,
    experts,
    gates,
    merging,
    retrieval,
    router_from_weights,
    router_vectors,
)
from colm.datasets import families
from colm.ginparse import parse_gin

# Settings look-ups import the dataset families lazily; their gin configurables must exist before gin locks.
families.import_all()

_EXPECTED_ERRORS = (ValueError, FileNotFoundError, KeyError, NotImplementedError, RuntimeError)


@gin.configurable
def func_caller(func=gin.REQUIRED):
    """Calls the bound function; its arguments come from gin bindings (`<function>.<arg>=...`)."""
    if not callable(func):
        raise ValueError(f"func_caller.func must be a function reference such as @put_index_to_lora, got {func!r}.")
    return func()


def _func_is_bound() -> bool:
    try:
        gin.query_parameter("func_caller.func")
        return True
    except ValueError:
        return False


def run(argv=None, default_func=None, description=__doc__) -> int:
    """Parses --gin_files/--gin_bindings, calls func_caller; returns the exit status (1 on a refused input)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gin_files", nargs="*", default=[])
    parser.add_argument("--gin_bindings", nargs="*", default=[])
    args = parser.parse_args(argv)
    # A default goes first so that a func_caller.func binding from the user overrides it.
    bindings = ([f"func_caller.func=@{default_func}"] if default_func else []) + list(args.gin_bindings)
    try:
        parse_gin(args.gin_files, bindings)
        if not _func_is_bound():
            raise ValueError("Nothing to run: bind the function, e.g. --gin_bindings "
                             "'func_caller.func=@put_index_to_lora' 'put_index_to_lora.path=\"...\"' ...")
        func_caller()
    except _EXPECTED_ERRORS as error:
        print(f"[colm] error: {error}", file=sys.stderr)
        return 1
    return 0
