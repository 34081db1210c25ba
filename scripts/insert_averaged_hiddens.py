"""Write an expert's averaged activations as its router vectors (colm/checkpoints/averaged_hiddens.py).

    python scripts/insert_averaged_hiddens.py --exp_name datasets_concatenated/P3Socialiqa_t5xl_lora \
        --dataset D/P3SOCIALIQA/TRAIN --index 0 --hiddens_suffix _a2

Reads exp_out/<exp_name>/averaged_hiddens<suffix>/<dataset with / -> _>.safetensors and rewrites
exp_out/<exp_name>/best.pt. Run from the repository root after `source exp_launch/setup_environment_variable.sh`.
"""

import argparse
import sys

from colm.checkpoints.averaged_hiddens import insert_averaged_hiddens


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exp_name", required=True, help="experiment path relative to exp_out/")
    parser.add_argument("--dataset", required=True, help="the averaged dataset's scope, e.g. D/P3SOCIALIQA/TRAIN")
    parser.add_argument("--index", type=int, default=0, help="the expert whose router vectors are written")
    parser.add_argument("--hiddens_suffix", default="_a2")
    parser.add_argument("--component", default=None, help="None, pretrained or task (against the C4 averages)")
    parser.add_argument("--arch", default="A2", choices=("A2", "A1"))
    args = parser.parse_args(argv)
    try:
        insert_averaged_hiddens(args.exp_name, args.dataset, args.index, args.hiddens_suffix, args.component,
                                args.arch)
    except (ValueError, FileNotFoundError, KeyError, NotImplementedError, RuntimeError) as error:
        print(f"[colm] error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
