"""Concatenate one-expert checkpoints into one MoE checkpoint (colm/checkpoints/concatenate.py).

    python scripts/concatenate.py --gin_bindings 'run_concatenate.datasets="Full"' \
        'run_concatenate.suffix="t5xl_lora_inpgatetrainnogumbel"' \
        'run_concatenate.out_path="FullCompleteA2inpgatetrainnogumbel_t5xl_lora_concatenated"'

Runs run_concatenate unless func_caller.func names another function (e.g. @commands_concatenate).
Run from the repository root after `source exp_launch/setup_environment_variable.sh`.
"""

import sys

from colm.checkpoints.cli import run

if __name__ == "__main__":
    sys.exit(run(default_func="run_concatenate", description=__doc__))
