# Shared by the launchers: flag parsing, the model type, the dataset registries, running colm.main.
# Launchers are run from the repository root, as the README shows.

if [ -z "${COLM_ROOT:-}" ]; then
  source "$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)/exp_launch/setup_environment_variable.sh"
fi
cd "$COLM_ROOT"

# parse_flags "name1 name2 ..." "$@": sets $name for each `-name value`; an unknown flag is an error.
parse_flags() {
  local known=" $1 "
  shift
  while [ $# -gt 0 ]; do
    local flag="${1#-}"
    if [ "$flag" = "$1" ] || [[ "$known" != *" $flag "* ]]; then
      echo "$(basename "$0"): unknown flag '$1'. Known flags: $(echo $known | sed 's/\([^ ]*\)/-\1/g')" >&2
      exit 2
    fi
    if [ $# -lt 2 ]; then
      echo "$(basename "$0"): flag '$1' needs a value." >&2
      exit 2
    fi
    printf -v "$flag" '%s' "$2"
    shift 2
  done
}

require_flags() {
  for flag in "$@"; do
    if [ -z "${!flag:-}" ]; then
      echo "$(basename "$0"): -$flag is required." >&2
      exit 2
    fi
  done
}

# The model type: -model_type, else $MODEL_TYPE, else t5xl. Selects colm/models/<model_type>/.
model_gin_dir() {
  local dir="colm/models/${model_type:-${MODEL_TYPE:-t5xl}}"
  if [ ! -d "$dir" ]; then
    echo "$(basename "$0"): no model type '${model_type:-${MODEL_TYPE:-t5xl}}' (no folder $dir); use t5xl or tiny." >&2
    exit 2
  fi
  echo "$dir"
}

# Every dataset registry there is (objects are built only when a scope is named, so this costs little).
dataset_registries() {
  local mt="${model_type:-${MODEL_TYPE:-t5xl}}"
  for name in p3 flanv2 bigbench; do
    if [ -f "colm/datasets/${name}_${mt}.gin" ]; then echo "colm/datasets/${name}_${mt}.gin"
    elif [ -f "colm/datasets/${name}_t5xl.gin" ]; then echo "colm/datasets/${name}_t5xl.gin"
    elif [ -f "colm/datasets/${name}.gin" ]; then echo "colm/datasets/${name}.gin"; fi
  done
  echo "colm/datasets/toy.gin"
}

run_colm() {
  echo "[launcher] EXP_NAME=$EXP_NAME $PYTHON_EXEC -m colm.main $*" >&2
  "$PYTHON_EXEC" -m colm.main "$@"
}

# Router flags shared by the MoE launchers: -score_type, -scaling_scores, -elementwise_affine.
router_bindings() {
  echo "M/MODEL/Router.score_type=\"${score_type:-original}\""
  echo "M/MODEL/Router.scaling_scores=${scaling_scores:-True}"
  echo "M/MODEL/Router.elementwise_affine=${elementwise_affine:-False}"
}
