"""Centred routing: measure every router's mean input and write a calibrated copy of a checkpoint
(colm/procedures/calibration.py, colm/experiments/calibrate.gin).

    python scripts/calibrate_routers.py --exp_name ToyA2inpgatetrainnogumbel_tiny_lora_concatenated \
        --out_path ToyA2inpgatetrainnogumbel_tiny_lora_concatenated_centred --setting Toy [--num_examples 50] \
        [--model_type tiny] [--arch A2] [--gin_bindings 'M/MODEL/FFNExperts.topk_value=2' ...]

--exp_name / --out_path are experiment paths relative to exp_out/ (exp_out/<path>/best.pt); out_path must differ.
Calibration data: --datasets D/TOYREVERSE/TRAIN ... (scopes), or --setting with a setting name ("P3", "Toy") or
expert names, whose TRAIN scopes are used (the held-in tasks of the concatenated checkpoint). The model is built
as eval_multitask.sh builds it (dataset registries, colm/models/<model_type>/t5.gin, the -arch gin, top-2
routing with renormalisation); --gin_bindings come last and win. Evaluate the output like any checkpoint
(eval_multitask.sh -exp_name <out_path>): its routers centre their inputs; bind
M/MODEL/Router.center_inputs=False to evaluate it without centring.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

EVAL_DEFAULTS = ["M/MODEL/FFNExperts.topk_value=2", "M/MODEL/FFNExperts.normalize_topk=True"]


def gin_setup(args):
    """(gin files, bindings) for the calibration run."""
    from colm.datasets.families import registry_files
    from colm.models.model_gins import arch_gin, model_dir

    model_type = args.model_type or os.environ.get("MODEL_TYPE") or "t5xl"
    models = model_dir(model_type)
    arch_file = arch_gin(args.arch, model_type, allowed=("A2", "A1"))
    if bool(args.datasets) == bool(args.setting):
        raise ValueError("Give the calibration data with exactly one of --datasets D/<SCOPE>/TRAIN ... or "
                         "--setting <setting name or expert names>.")
    if args.setting:
        from colm.datasets.settings import get_setting

        setting = args.setting[0] if len(args.setting) == 1 else list(args.setting)
        datasets = [f"D/{scope}/TRAIN" for scope in get_setting(setting, check_scopes=False).values()]
    else:
        datasets = list(args.datasets)
    files = registry_files(model_type) + [os.path.join(models, "t5.gin"), arch_file, "colm/experiments/calibrate.gin"]
    bindings = EVAL_DEFAULTS + [
        f"P/CALIBRATE/RouterCalibrator.datasets={json.dumps(datasets)}",
        f"P/CALIBRATE/RouterCalibrator.out_path={json.dumps(args.out_path)}",
        f"P/CALIBRATE/RouterCalibrator.num_examples={int(args.num_examples)}",
        "main.logging_backend=None",
    ] + list(args.gin_bindings)
    return files, bindings


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exp_name", required=True, help="the checkpoint to calibrate: exp_out/<exp_name>/best.pt")
    parser.add_argument("--out_path", required=True, help="where the calibrated copy goes: exp_out/<out_path>/best.pt")
    parser.add_argument("--datasets", nargs="*", default=[], help="calibration scopes, e.g. D/TOYREVERSE/TRAIN")
    parser.add_argument("--setting", nargs="*", default=[], help="a setting name or expert names (TRAIN scopes)")
    parser.add_argument("--num_examples", type=int, default=50, help="examples per dataset (default 50)")
    parser.add_argument("--model_type", default=None, help="colm/models/<model_type>/ (default $MODEL_TYPE or t5xl)")
    parser.add_argument("--arch", default="A2", help="A2 (default) or A1, as eval_multitask.sh -arch")
    parser.add_argument("--gin_bindings", nargs="*", default=[], help="extra bindings, applied last")
    args = parser.parse_args(argv)
    os.environ["EXP_NAME"] = args.exp_name
    try:
        files, bindings = gin_setup(args)
        from colm import configurables  # noqa: F401  (registers every gin configurable)
        from colm.ginparse import parse_gin
        from colm.main import main as run_main

        parse_gin(files, bindings)
        run_main()
    except (ValueError, FileNotFoundError, KeyError, RuntimeError) as error:
        print(f"[colm] error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
