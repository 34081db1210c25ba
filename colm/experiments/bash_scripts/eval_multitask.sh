#!/usr/bin/env bash
# Evaluate a (concatenated) MoE checkpoint exp_out/<exp_name>/best.pt, by default with top-2 token routing
# ("A2") on the T0 held-in evaluation sets. The defaults are always applied; -extra_bindings come after them
# and win (the original dropped its defaults whenever -extra_bindings was given).
#   bash colm/experiments/bash_scripts/eval_multitask.sh -exp_name FLAN_Phatgoose -extra_bindings '...'
# -arch A2 | A1 | single (colm/models/model_gins.py): single is the sentence-level recipe of the one-expert
# baselines (Single expert, Merged Experts, Multitask), every expert weighted, so no top-k.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
exp_name="" arch="A2" model_type="" extra_bindings="" extra_gin_files="" score_type="" scaling_scores="" elementwise_affine=""
parse_flags "exp_name arch model_type extra_bindings extra_gin_files score_type scaling_scores elementwise_affine" "$@"
require_flags exp_name
model_dir="$(model_gin_dir)"
arch_file="$(arch_gin "$arch")"
load_extra_gin_files
topk=('M/MODEL/FFNExperts.topk_value=2' 'M/MODEL/FFNExperts.normalize_topk=True')
if [ "$arch" = single ]; then
  topk=()  # the single gin sets topk_value=None
fi
mapfile -t router < <(router_bindings)
EXP_NAME="$exp_name" run_colm \
  --gin_files $(dataset_registries) "$model_dir/t5.gin" "$arch_file" colm/experiments/eval.gin "${extra_gin[@]}" \
  --gin_bindings 'P/EVALUATE/Evaluator.datasets=@P/EVALUATE/setting_scopes()' 'P/EVALUATE/setting_scopes.setting="P3"' \
    "${topk[@]}" "${router[@]}" "$extra_bindings"
