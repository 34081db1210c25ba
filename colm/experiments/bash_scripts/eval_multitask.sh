#!/usr/bin/env bash
# Evaluate a (concatenated) MoE checkpoint exp_out/<exp_name>/best.pt, by default with top-2 token routing
# ("A2") on the T0 held-in evaluation sets. The defaults are always applied; -extra_bindings come after them
# and win (the original dropped its defaults whenever -extra_bindings was given).
#   bash colm/experiments/bash_scripts/eval_multitask.sh -exp_name FLAN_Phatgoose -extra_bindings '...'
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
exp_name="" arch="A2" model_type="" extra_bindings="" extra_gin_files="" score_type="" scaling_scores="" elementwise_affine=""
parse_flags "exp_name arch model_type extra_bindings extra_gin_files score_type scaling_scores elementwise_affine" "$@"
require_flags exp_name
model_dir="$(model_gin_dir)"
load_extra_gin_files
case "$arch" in
  A2) arch_gin="$model_dir/moe_lora_rank16_a2.gin" ;;
  A1) arch_gin="$model_dir/moe_lora_rank16_a1.gin" ;;
  *) echo "$(basename "$0"): -arch must be A2 or A1, got '$arch'." >&2; exit 2 ;;
esac
mapfile -t router < <(router_bindings)
EXP_NAME="$exp_name" run_colm \
  --gin_files $(dataset_registries) "$model_dir/t5.gin" "$arch_gin" colm/experiments/eval.gin "${extra_gin[@]}" \
  --gin_bindings 'P/EVALUATE/Evaluator.datasets=@P/EVALUATE/setting_scopes()' 'P/EVALUATE/setting_scopes.setting="P3"' \
    'M/MODEL/FFNExperts.topk_value=2' 'M/MODEL/FFNExperts.normalize_topk=True' \
    "${router[@]}" "$extra_bindings"
