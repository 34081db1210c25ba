"""Entry point: `python -m colm.main --gin_files F1 F2 ... --gin_bindings B1 B2 ...`.

Files are parsed in order, then bindings (later wins). `main.procedure_exec_order` names the procedures
(`P/...` scopes) to build and run, in order; the same name twice is the same object run twice.
"""

import argparse
import os
import signal
import sys

import gin

from colm import (
    configurables,  # noqa: F401  (registers every gin configurable)
    registry,
)
from colm.ginparse import parse_gin
from colm.utils import distributed
from colm.utils.logging import finish_logger, log_config, setup_logger
from colm.utils.paths import expand
from colm.utils.progress import quiet_library_bars
from colm.utils.run_dir import ExperimentDirError
from colm.utils.seed import set_seeds


@gin.configurable
def main(exp_name="debug", procedure_exec_order=(), global_seed=None, logging_backend=None):
    exp_name = expand(exp_name, "main.exp_name")
    # Output paths in the gin files use ${EXP_NAME}; a direct call with main.exp_name=... must work too.
    os.environ.setdefault("EXP_NAME", exp_name)
    if global_seed is not None:
        set_seeds(global_seed)  # the same seed on every rank under torchrun: the same initial experts everywhere
    # Under torchrun: join the process group before anything is built (the model goes to this rank's GPU).
    created_group = distributed.init()
    if distributed.is_main():  # one log (and one wandb run): rank 0's
        setup_logger(logging_backend, exp_name)
    try:
        procedures = [registry.get_object(name) for name in procedure_exec_order]
        log_config()  # every binding the built procedures used, as the wandb config
        if distributed.is_main():
            if not procedures:
                print("[colm] main.procedure_exec_order is empty: nothing to run.")
            for name, procedure in zip(procedure_exec_order, procedures):
                print(f"[colm] {name}: {procedure.describe()}")
        for procedure in procedures:
            procedure.run_in_scope()
    finally:
        finish_logger()
        if created_group:
            distributed.teardown()
    return procedures


def handle_stop_signals():
    """SIGTERM (a scheduler's preemption, or the launcher forwarding one) ends the run through Python's normal
    exit, so an interrupted save removes its temporary file; Ctrl-C works even when a launcher started us in the
    background (bash starts background jobs with SIGINT ignored). The resume checkpoint takes it from there."""

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def cli(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gin_files", nargs="+", default=[])
    parser.add_argument("--gin_bindings", nargs="*", default=[])
    args = parser.parse_args(argv)
    handle_stop_signals()
    if hasattr(sys.stdout, "reconfigure") and not sys.stdout.isatty():
        sys.stdout.reconfigure(line_buffering=True)  # in a log file, our lines stay in order with stderr's
    quiet_library_bars()  # no carriage-return frames from library bars when the output is a log file
    parse_gin(args.gin_files, args.gin_bindings)
    try:
        main()
    except ExperimentDirError as error:  # an expected refusal (finished run, directory in use): no traceback
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank refuses; one says why
            print(f"[colm] error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(cli())
