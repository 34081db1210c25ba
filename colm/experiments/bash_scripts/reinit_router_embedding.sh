#!/usr/bin/env bash
# Average Activation baseline, one expert (spec 4.8.3): with -compute_hiddens True, average the input of every
# linear over up to 1000 examples of D/<dataset>/TRAIN, generating with the expert applied alone
# (SaveAveragedHiddens, into exp_out/<exp_name>/averaged_hiddens<suffix>/); then write those averages as the
# expert's router vectors into exp_out/<exp_name>/best.pt (scripts/insert_averaged_hiddens.py).
#   bash colm/experiments/bash_scripts/reinit_router_embedding.sh -exp_name datasets_concatenated/P3Socialiqa_t5xl_lora \
#     -dataset P3SOCIALIQA -arch A2 -compute_hiddens True -hiddens_suffix _a2
# -component pretrained|task keeps the part along / orthogonal to the C4 averages; -extra_bindings win.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
exp_name="" dataset="" arch="A2" component="None" compute_hiddens="False" hiddens_suffix="_a2" model_type=""
extra_bindings="" extra_gin_files="" score_type="" scaling_scores="" elementwise_affine="" max_examples="1000"
parse_flags "exp_name dataset arch component compute_hiddens hiddens_suffix model_type extra_bindings extra_gin_files score_type scaling_scores elementwise_affine max_examples" "$@"
require_flags exp_name dataset
model_dir="$(model_gin_dir)"
arch_file="$(arch_gin "$arch" A2 A1)"  # the averages become A2's or A1's router vectors
load_extra_gin_files
case "$compute_hiddens" in
  True|False) ;;
  *) echo "$(basename "$0"): -compute_hiddens must be True or False, got '$compute_hiddens'." >&2; exit 2 ;;
esac
scope="D/$dataset/TRAIN"

if [ "$compute_hiddens" = True ]; then
  # Dataset classes hand metrics and max_examples_per_dataset to the base class themselves, so those bindings
  # must name the class: read it from the scope's `build.cls = @<Class>` line in the registries.
  registries=$(dataset_registries)
  dataset_class=$(sed -n "s|^$scope/build\.cls *= *@\([A-Za-z0-9_]*\).*|\1|p" $registries "${extra_gin[@]}" | tail -n 1)
  if [ -z "$dataset_class" ]; then
    echo "$(basename "$0"): no '$scope/build.cls = @<Class>' line in $(echo $registries "${extra_gin[@]}"); check -dataset '$dataset'" \
      "(a scope of your own needs its gin file in -extra_gin_files)." >&2
    exit 2
  fi
  save_dir="exp_out/$exp_name/averaged_hiddens$hiddens_suffix"
  mapfile -t router < <(router_bindings)
  # Generation ("gen") supplies the decoder tokens; TRAIN splits have no metric, and exact_match is only there
  # so that the Evaluator runs the split (its score lands in $save_dir/results.txt, not the expert's).
  # No top-k: the expert is applied alone, at routing weight 1.
  EXP_NAME="$exp_name" run_colm \
    --gin_files $registries "$model_dir/t5.gin" "$arch_file" colm/experiments/eval.gin "${extra_gin[@]}" \
    --gin_bindings "P/EVALUATE/Evaluator.datasets=\"$scope\"" "$scope/InterfaceInfo.interface=\"gen\"" \
      "$scope/$dataset_class.metrics=[\"exact_match\"]" "$scope/$dataset_class.max_examples_per_dataset=$max_examples" \
      'P/EVALUATE/Evaluator.analysis_processors=[@SaveAveragedHiddens()]' "SaveAveragedHiddens.save_dir=\"$save_dir\"" \
      "save_results.save_dir=\"$save_dir\"" "${router[@]}" "$extra_bindings"
fi

run_python scripts/insert_averaged_hiddens.py --exp_name "$exp_name" --dataset "$scope" --index 0 \
  --hiddens_suffix "$hiddens_suffix" --component "$component" --arch "$arch"
