#!/usr/bin/env bash
# Evaluate a plain LoRA expert (exp_out/<exp_name>/best.pt) on one dataset's EVAL split.
#   bash colm/experiments/bash_scripts/eval_single_task_loralinear.sh -exp_name P3Socialiqa_t5xl_lora -dataset P3SOCIALIQA
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
exp_name="" dataset="" model_type="" extra_bindings="" extra_gin_files=""
parse_flags "exp_name dataset model_type extra_bindings extra_gin_files" "$@"
require_flags exp_name dataset
model_dir="$(model_gin_dir)"
load_extra_gin_files
EXP_NAME="$exp_name" run_colm \
  --gin_files $(dataset_registries) "$model_dir/t5.gin" colm/models/moe_lora_rank16.gin colm/experiments/eval.gin "${extra_gin[@]}" \
  --gin_bindings "P/EVALUATE/Evaluator.datasets=\"D/$dataset/EVAL\"" "$extra_bindings"
