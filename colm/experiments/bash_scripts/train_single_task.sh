#!/usr/bin/env bash
# One expert trained directly in the MoE format (router + FFNExperts per linear, expert _0 from scratch).
#   bash colm/experiments/bash_scripts/train_single_task.sh -exp_name P3Socialiqa_moe -dataset P3SOCIALIQA
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
exp_name="" dataset="" model_type="" extra_bindings="" extra_gin_files="" score_type="" scaling_scores="" elementwise_affine=""
parse_flags "exp_name dataset model_type extra_bindings extra_gin_files score_type scaling_scores elementwise_affine" "$@"
require_flags exp_name dataset
model_dir="$(model_gin_dir)"
load_extra_gin_files
mapfile -t router < <(router_bindings)
EXP_NAME="$exp_name" run_colm \
  --gin_files $(dataset_registries) "$model_dir/t5.gin" "$model_dir/moe_lora_rank16.gin" \
    colm/experiments/train_single_task.gin colm/experiments/wandb.gin "${extra_gin[@]}" \
  --gin_bindings "P/TRAIN/Trainer.datasets=\"D/$dataset/TRAIN\"" "P/EVALUATE/Evaluator.datasets=\"D/$dataset/EVAL\"" \
    "${router[@]}" "$extra_bindings"
