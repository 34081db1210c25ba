#!/usr/bin/env bash
# Retrieval baseline (spec 4.8.5), three modes:
#   1. -make_expert_library True: embed up to 1000 training examples of every expert of -dataset_setting into
#      exp_out/elm_1000_ans_minlm/ (elm_1000_minlm with -include_answer_choices False);
#   2. -create_checkpoint True: put those libraries in place of the router vectors of the concatenated
#      checkpoint exp_out/<old_exp_name>/best.pt, writing exp_out/<exp_name>/best.pt;
#   3. otherwise: evaluate exp_out/<exp_name>/best.pt, each example routed to the ONE expert whose library
#      holds its nearest neighbour (by default on the setting's evaluation sets; -extra_bindings win).
#   bash colm/experiments/bash_scripts/retriever.sh -make_expert_library True -dataset_setting Full
#   bash colm/experiments/bash_scripts/retriever.sh -create_checkpoint True -dataset_setting Full
#   bash colm/experiments/bash_scripts/retriever.sh -dataset_setting Full
# -dataset_setting: P3, Flanv2, Niv2, Add1, All, Full, Toy, or a gin list of expert names
# ('["ToyContainsa", "ToySort"]', which then needs -exp_name and -old_exp_name); names of your own are
# "Name:SCOPE" or "Name" (scope = the name upper-cased without separators), with the gin file of their
# D/<SCOPE>/TRAIN|EVAL scopes in -extra_gin_files (colm/datasets/settings.py). Default names:
# old_exp_name <Setting>Complete<arch>_<model_type>_lora_concatenated, exp_name
# <Setting>Complete[ans]retrieval_<model_type>_lora_concatenated. -library_dir: the libraries' folder under exp_out/
# (default elm_<dataset_length>_[ans_]minlm). -extra_bindings go to the program the mode runs.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
make_expert_library="False" create_checkpoint="False" dataset_setting="All" include_answer_choices="True"
arch="A2" exp_name="" old_exp_name="" dataset_length="1000" model_type="" extra_bindings="" extra_gin_files="" library_dir=""
parse_flags "make_expert_library create_checkpoint dataset_setting include_answer_choices arch exp_name old_exp_name dataset_length model_type extra_bindings extra_gin_files library_dir" "$@"
for flag in make_expert_library create_checkpoint include_answer_choices; do
  case "${!flag}" in
    True|False) ;;
    *) echo "$(basename "$0"): -$flag must be True or False, got '${!flag}'." >&2; exit 2 ;;
  esac
done
if [ "$make_expert_library" = True ] && [ "$create_checkpoint" = True ]; then
  echo "$(basename "$0"): -make_expert_library and -create_checkpoint are separate steps; run one at a time." >&2
  exit 2
fi
arch_gin "$arch" A2 A1 >/dev/null  # -arch only names the default -old_exp_name
if ! [[ "$dataset_length" =~ ^[1-9][0-9]*$ ]]; then
  echo "$(basename "$0"): -dataset_length must be a positive integer, got '$dataset_length'." >&2
  exit 2
fi
model_dir="$(model_gin_dir)"
load_extra_gin_files
mt="${model_type:-${MODEL_TYPE:-t5xl}}"
ans=""
[ "$include_answer_choices" = True ] && ans="ans"
library="${library_dir:-elm_${dataset_length}_${ans:+ans_}minlm}"  # under exp_out/
case "$dataset_setting" in
  \[*) setting="$dataset_setting"  # a gin list of expert names: no default checkpoint names
       if [ "$make_expert_library" = False ]; then require_flags exp_name; fi
       if [ "$create_checkpoint" = True ]; then require_flags old_exp_name; fi ;;
  *) setting="\"$dataset_setting\""
     exp_name="${exp_name:-${dataset_setting}Complete${ans}retrieval_${mt}_lora_concatenated}"
     old_exp_name="${old_exp_name:-${dataset_setting}Complete${arch}_${mt}_lora_concatenated}" ;;
esac

if [ "$make_expert_library" = True ]; then
  EXP_NAME="$library" run_colm \
    --gin_files $(dataset_registries) colm/experiments/retriever.gin "${extra_gin[@]}" \
    --gin_bindings 'P/RETRIEVE/Retriever.datasets=@P/RETRIEVE/setting_scopes()' \
      "P/RETRIEVE/setting_scopes.setting=$setting" 'P/RETRIEVE/setting_scopes.split="TRAIN"' \
      "P/RETRIEVE/Retriever.include_answer_choices=$include_answer_choices" \
      "P/RETRIEVE/Retriever.expert_library_dir=\"exp_out/$library\"" \
      "P/RETRIEVE/Retriever.dataset_length=$dataset_length" "$extra_bindings"
elif [ "$create_checkpoint" = True ]; then
  echo "[launcher] make_checkpoint_for_retrieval exp_out/$old_exp_name + exp_out/$library -> exp_out/$exp_name" >&2
  run_python scripts/manipulations.py --gin_bindings 'func_caller.func=@make_checkpoint_for_retrieval' \
    "make_checkpoint_for_retrieval.checkpoint_path=\"$old_exp_name\"" \
    "make_checkpoint_for_retrieval.embeddings_path=\"$library\"" \
    "make_checkpoint_for_retrieval.out_path=\"$exp_name\"" \
    "make_checkpoint_for_retrieval.dataset_length=$dataset_length" \
    "make_checkpoint_for_retrieval.dataset_dict_str=$setting" "$extra_bindings"
else
  EXP_NAME="$exp_name" run_colm \
    --gin_files $(dataset_registries) "$model_dir/t5.gin" "$model_dir/moe_lora_retriever.gin" colm/experiments/eval.gin "${extra_gin[@]}" \
    --gin_bindings 'P/EVALUATE/Evaluator.datasets=@P/EVALUATE/setting_scopes()' \
      "P/EVALUATE/setting_scopes.setting=$setting" \
      "M/MODEL/FeatureExtractor.include_answer_choices=$include_answer_choices" \
      "retrieval_router_size.library_rows=$dataset_length" "$extra_bindings"
fi
