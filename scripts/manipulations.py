"""Offline checkpoint surgery (the gin-configurable functions of colm/checkpoints/) from the command line.

    python scripts/manipulations.py --gin_bindings 'func_caller.func=@put_index_to_lora' \
        'put_index_to_lora.path="P3Socialiqa_t5xl_lora"' \
        'put_index_to_lora.out_path="datasets_concatenated/P3Socialiqa_t5xl_lora"'

Paths are relative to exp_out/ (each names exp_out/<path>/best.pt). Run from the repository root after
`source exp_launch/setup_environment_variable.sh`.
"""

import sys

from colm.checkpoints.cli import run

if __name__ == "__main__":
    sys.exit(run(description=__doc__))
