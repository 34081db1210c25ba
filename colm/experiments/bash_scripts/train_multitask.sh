#!/usr/bin/env bash
# Multitask baseline: one LoRA on the union of a setting's datasets (temperature sampling over datasets).
#   bash colm/experiments/bash_scripts/train_multitask.sh -exp_name P3_multitask_t5xl_lora -dataset_setting P3
# -dataset_setting: a setting name, or a gin list of expert names ('["MyEcho", "MySentiment:REVIEWS"]': see
# colm/datasets/settings.py; scopes of your own come with -extra_gin_files "my_tasks.gin").
# Then, as for any LoRA expert: put_index_to_lora and eval_multitask.sh with sentence-level routing.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
exp_name="" dataset_setting="" model_type="" extra_bindings="" extra_gin_files=""
parse_flags "exp_name dataset_setting model_type extra_bindings extra_gin_files" "$@"
require_flags exp_name dataset_setting
model_dir="$(model_gin_dir)"
load_extra_gin_files
setting="\"$dataset_setting\""
[[ "$dataset_setting" == "["* ]] && setting="$dataset_setting"  # an explicit list of expert names
EXP_NAME="$exp_name" run_colm \
  --gin_files $(dataset_registries) "$model_dir/t5.gin" colm/models/moe_lora_rank16.gin \
    colm/experiments/train_multitask.gin colm/experiments/wandb.gin "${extra_gin[@]}" \
  --gin_bindings "P/TRAIN/setting_scopes.setting=$setting" "P/EVALUATE/setting_scopes.setting=$setting" \
    "$extra_bindings"
