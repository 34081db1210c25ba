#!/usr/bin/env bash
# The main job on the embedded default: sets up .venv if needed, then, on the tiny T5 and the toy tasks,
# trains a LoRA expert with the framework's own launcher and evaluates it against the untrained model.
# (The full PHATGOOSE pipeline — experts, gates, routing, baselines — replaces this as it lands.)
#   bash exp_launch/quickstart.sh                 # outputs under exp_out/quickstart/
#   STEPS=300 TASK=TOYCONTAINSA bash exp_launch/quickstart.sh
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash exp_launch/setup_python_env.sh
source exp_launch/setup_environment_variable.sh
# Tiny models gain nothing from intra-op threads; spinning OpenMP threads slow a shared 2-core machine tenfold.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export MODEL_TYPE=tiny HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE="${WANDB_MODE:-disabled}"
task="${TASK:-TOYCONTAINSA}"
steps="${STEPS:-200}"
out="quickstart/${task}_lora"
rm -rf "exp_out/$out"  # a fresh run each time; nothing else under exp_out/ is touched
bash colm/experiments/bash_scripts/train_single_task_loralinear.sh -exp_name "$out" -dataset "$task" \
  -extra_bindings "P/TRAIN/Trainer.gradient_accumulation_factor=1 P/TRAIN/Trainer.num_steps=$steps P/TRAIN/Trainer.validation_step_interval=50 main.logging_backend=None"
bash colm/experiments/bash_scripts/eval_single_task_loralinear.sh -exp_name "$out" -dataset "$task" \
  -extra_bindings "main.logging_backend=None"
echo
echo "== $task: the first line is the untrained model (step-0 validation), the last the trained expert =="
"$PYTHON_EXEC" scripts/show_results.py "exp_out/$out/results.txt"
