#!/usr/bin/env bash
# The main job on the embedded default: sets up .venv if needed, then runs the whole PHATGOOSE pipeline on
# the tiny T5 and the toy tasks through the framework's own launchers (colm/quickstart.py): experts, gates,
# concatenation, and PHATGOOSE against every baseline on held-in and held-out tasks. Prints the table and
# writes exp_out/quickstart/results.md and routing heatmaps. A re-run skips the stages already done.
#   bash exp_launch/quickstart.sh            # the full run
#   bash exp_launch/quickstart.sh --fast     # a reduced run, in exp_out/quickstart_fast/
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash exp_launch/setup_python_env.sh
source exp_launch/setup_environment_variable.sh
# Tiny models gain nothing from intra-op threads; spinning OpenMP threads slow a shared 2-core machine tenfold.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export MODEL_TYPE=tiny HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE="${WANDB_MODE:-disabled}"
"$PYTHON_EXEC" -m colm.quickstart "$@"
