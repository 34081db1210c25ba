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
from colm.ginparse import parse_gin
from colm.utils.logging import setup_logger
from colm.utils.paths import expand
from colm.utils.seed import set_seeds


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
