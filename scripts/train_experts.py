"""Train and gate every expert of a setting as independent jobs: a local pool, or a SLURM job array.

    python scripts/train_experts.py --setting Full --workers 4 --extra_bindings 'P/TRAIN/Trainer.gradient_accumulation_factor=32'
    python scripts/train_experts.py --setting Full --slurm train_Full.sh [--sbatch partition=gpu --sbatch time=48:00:00]
    python scripts/train_experts.py --setting Full --report

Each expert is the README's four commands (train_single_task_loralinear.sh, put_index_to_lora, train_gate.sh,
use_input_gate_as_router; colm/procedures/expert_jobs.py), writing exp_out/<name>_<suffix>/ and
exp_out/datasets_concatenated/<name>_<suffix>{,_inpgatetrainnogumbel}/ (suffix default <model_type>_lora), ready
for scripts/concatenate.py. --setting takes a setting name ("Full", "P3", "Toy"), expert names, or names of your
own tasks ("Name" or "Name:SCOPE", with their gin files in --extra_gin_files), as the launchers' -dataset_setting.

A finished expert leaves a marker in exp_out/<root>/.stages/ (root default train_experts) and is skipped by
every later run, pool or SLURM; an interrupted one goes on from its first unfinished command. A failed expert
is tried again --retries times, then reported with its log (exp_out/<root>/logs/); the others go on, and the
exit status is 1. The table of every expert (status, time, expert and gate validation scores) is printed and
written to exp_out/<root>/<setting>_<suffix>.md (a list of names: experts_<names>_<suffix>.md); --report prints
and writes it without running anything (after a SLURM run).
Run from the repository root after `source exp_launch/setup_environment_variable.sh`.
"""

import argparse
import ast
import os
import shlex
import stat
import sys
import zlib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from colm.datasets.settings import all_settings, get_setting  # noqa: E402
from colm.procedures.expert_jobs import ExpertJobs  # noqa: E402
from colm.procedures.stages import FAILED, NOT_RUN, tail  # noqa: E402


def parse_setting(values):
    """(setting name or list, label): `Full`; `A B C` or a single expert name; or one gin-style list
    `["A", "B:SCOPE"]`. A list's label names its table file, so two lists do not share one."""
    if len(values) == 1 and values[0].strip().startswith("["):
        names = list(ast.literal_eval(values[0]))
    elif len(values) == 1 and values[0] in all_settings():
        return values[0], values[0]
    else:
        names = list(values)
    return names, list_label(names)


def list_label(names, max_names=3):
    """experts_A_B_C for up to three names; beyond, the first name, the count and a checksum of them all."""
    plain = [name.split(":")[0] for name in names]
    if len(plain) <= max_names:
        return "experts_" + "_".join(plain)
    return f"experts_{plain[0]}_and_{len(plain) - 1}_more_{zlib.crc32(' '.join(names).encode()):08x}"


def parse_sbatch(options):
    """["partition=gpu", "time=48:00:00"] -> {"partition": "gpu", "time": "48:00:00"}."""
    parsed = {}
    for option in options:
        key, sep, value = option.lstrip("-").partition("=")
        if not sep or not key:
            raise ValueError(f"--sbatch {option!r}: give OPTION=VALUE, e.g. --sbatch partition=gpu")
        parsed[key] = value
    return parsed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", nargs="+", required=True, help="a setting name, expert names, or a list [\"A\", ...]")
    parser.add_argument("--workers", type=int, default=None, help="experts trained at once in the pool (default 2); "
                        "with --slurm, at most that many array tasks at once (default: no limit)")
    parser.add_argument("--devices", default="", help="GPUs of the pool, e.g. 0,1,2,3: one worker each "
                        "(CUDA_VISIBLE_DEVICES); replaces --workers")
    parser.add_argument("--retries", type=int, default=0, help="further attempts for a failed expert (default 0)")
    parser.add_argument("--extra_bindings", default="", help="gin bindings for both trainings (as the launchers')")
    parser.add_argument("--expert_bindings", default="", help="gin bindings for the LoRA training only, after --extra_bindings")
    parser.add_argument("--gate_bindings", default="", help="gin bindings for the gate training only, after --extra_bindings")
    parser.add_argument("--extra_gin_files", default="", help="\"a.gin b.gin\": your own task registries (as the launchers')")
    parser.add_argument("--model_type", default=None, help="colm/models/<model_type>/ (default $MODEL_TYPE or t5xl)")
    parser.add_argument("--suffix", default=None, help="expert folders <name>_<suffix> (default <model_type>_lora)")
    parser.add_argument("--root", default="train_experts", help="markers, logs and table under exp_out/<root>/")
    parser.add_argument("--slurm", default=None, metavar="FILE", help="write a SLURM job-array script instead of running")
    parser.add_argument("--sbatch", action="append", default=[], metavar="OPTION=VALUE",
                        help="an #SBATCH option for --slurm (repeatable), e.g. partition=gpu")
    parser.add_argument("--report", action="store_true", help="print the table from the markers; run nothing")
    args = parser.parse_args(argv)

    model_type = args.model_type or os.environ.get("MODEL_TYPE") or "t5xl"
    try:
        setting_arg, label = parse_setting(args.setting)
        # Scopes of your own tasks are checked by the launchers, which parse --extra_gin_files.
        setting = get_setting(setting_arg, check_scopes=False)
        sbatch = parse_sbatch(args.sbatch)
    except (ValueError, SyntaxError) as error:
        print(f"[train_experts] error: {error}", file=sys.stderr)
        return 2
    jobs = ExpertJobs(setting, root=args.root, suffix=args.suffix or f"{model_type}_lora", model_type=model_type,
                      bindings=args.extra_bindings, expert_bindings=args.expert_bindings,
                      gate_bindings=args.gate_bindings, extra_gin_files=args.extra_gin_files, label=label)

    report = (f"python scripts/train_experts.py --setting {' '.join(shlex.quote(v) for v in args.setting)} "
              f"--model_type {model_type} --root {args.root} --report")
    if args.slurm:
        os.makedirs(jobs.log_dir(), exist_ok=True)  # SLURM opens its --output files there and creates no folder
        with open(args.slurm, "w") as f:
            f.write(jobs.slurm_script(os.getcwd(), retries=args.retries, sbatch=sbatch, throttle=args.workers))
        os.chmod(args.slurm, os.stat(args.slurm).st_mode | stat.S_IXUSR)
        print(f"[train_experts] wrote {args.slurm}: {len(setting)} array tasks (0-{len(setting) - 1}), one expert each. "
              f"Submit with `sbatch {args.slurm}`; afterwards `{report}` gathers the table.")
        return 0

    if args.report:
        rows = jobs.rows()
    else:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, MODEL_TYPE=model_type)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        devices = [d.strip() for d in args.devices.split(",") if d.strip()]
        workers = len(devices) or args.workers or 2
        # Each job's processes share the cores with the other workers' (unless the user chose a thread count).
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
        try:
            rows = jobs.run_pool(workers=workers, retries=args.retries, devices=devices or None, env=env)
        except KeyboardInterrupt:
            print("[train_experts] interrupted: the same command goes on where this run stopped (finished experts "
                  "and commands are skipped).", file=sys.stderr)
            return 130
    print(jobs.table(rows), flush=True)  # before the failures on stderr, so that the two do not interleave
    print(f"[train_experts] table written to {jobs.table_file()}", flush=True)
    failed = [row for row in rows if row.status == FAILED]
    for row in failed:
        print(f"[train_experts] FAILED: {row.name} (D/{row.scope}/TRAIN); log {row.log}; its last lines:\n"
              + tail(row.log, 15), file=sys.stderr)
    if failed:
        again = ("then run the pool or re-submit the SLURM script" if args.report else
                 "then run the same command again")
        print(f"[train_experts] {len(failed)} of {len(rows)} experts failed; fix the cause, {again}: finished experts "
              "are skipped.", file=sys.stderr)
        return 1
    if all(row.status != NOT_RUN for row in rows):
        print(f"[train_experts] every expert has its gate; next, one checkpoint of them all:\n  {jobs.concatenate_command()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
