#!/usr/bin/env bash
# Stage 2, PHATGOOSE gate training: load a 1-expert MoE checkpoint (from put_index_to_lora), freeze
# everything but one gate vector per linear, train 100 steps with sigmoid(g.x) scaling the expert's input.
# best.pt holds the gates at the end of training (as in the paper): validation only reports, because the
# untrained gates (zero vectors) can score as well as trained ones and would make a useless router vector.
#   bash colm/experiments/bash_scripts/train_gate.sh -exp_name datasets_concatenated/P3Socialiqa_t5xl_lora_inpgatetrainnogumbel \
#     -dataset P3SOCIALIQA -old_exp_name datasets_concatenated/P3Socialiqa_t5xl_lora \
#     -extra_bindings 'main.logging_backend=None P/TRAIN/Trainer.gradient_accumulation_factor=32'
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
exp_name="" dataset="" old_exp_name="" model_type="" extra_bindings="" extra_gin_files="" score_type="" scaling_scores="" elementwise_affine=""
parse_flags "exp_name dataset old_exp_name model_type extra_bindings extra_gin_files score_type scaling_scores elementwise_affine" "$@"
require_flags exp_name dataset old_exp_name
model_dir="$(model_gin_dir)"
load_extra_gin_files
mapfile -t router < <(router_bindings)
EXP_NAME="$exp_name" run_colm \
  --gin_files $(dataset_registries) "$model_dir/t5.gin" "$model_dir/moe_lora_rank16.gin" \
    colm/experiments/train_single_task.gin colm/experiments/wandb.gin "${extra_gin[@]}" \
  --gin_bindings "P/TRAIN/Trainer.datasets=\"D/$dataset/TRAIN\"" "P/EVALUATE/Evaluator.datasets=\"D/$dataset/EVAL\"" \
    'M/MODEL/Model.trainable_params="gate"' 'P/TRAIN/Trainer.num_steps=100' \
    'M/MODEL/FFNExperts.learn_input_gate="only_sigmoid"' 'main.procedure_exec_order=["P/TRAIN"]' \
    'P/EVALUATE/Evaluator.better_model_moma_calls=[]' \
    'P/TRAIN/Trainer.finish_moma_calls=[@MOMA/DONE/save_weights, @MOMA/BEST/save_weights]' \
    'M/MODEL/moma_calls.experts=[@M/MODEL/load_weights]' "M/MODEL/load_weights.weight_path=\"exp_out/$old_exp_name/best.pt\"" \
    "${router[@]}" "$extra_bindings"
