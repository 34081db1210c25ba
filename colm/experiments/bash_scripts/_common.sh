# Shared by the launchers: flag parsing, the model type, the dataset registries, running colm.main.
# Launchers are run from the repository root, as the README shows.

if [ -z "${COLM_ROOT:-}" ]; then
  source "$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)/exp_launch/setup_environment_variable.sh"
fi
cd "$COLM_ROOT"

# parse_flags "name1 name2 ..." "$@": sets $name for each `-name value`; an unknown or repeated flag is an error
# (a second -extra_bindings would otherwise silently drop the first one's bindings).
parse_flags() {
  local known=" $1 " seen=" "
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
    if [[ "$seen" == *" $flag "* ]]; then
      echo "$(basename "$0"): flag '$1' is given twice; give it once (put all gin bindings in one -extra_bindings '...')." >&2
      exit 2
    fi
    seen+="$flag "
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

# The model gins (colm/models/model_gins.py is the one place that maps the flags to files). Called as
# `x="$(model_gin_dir)"`, an error ends the launcher (set -e) after the reason is printed.
# model_gin_dir: colm/models/<model_type>, the model type being -model_type, else $MODEL_TYPE, else t5xl.
# arch_gin ARCH [ALLOWED ...]: the model gin of -arch ARCH (A2, A1, single), ALLOWED narrowing the choice.
model_gin_dir() {
  _model_gins
}
arch_gin() {
  _model_gins "$@"
}
_model_gins() {
  local out status=0
  out="$("$PYTHON_EXEC" -m colm.models.model_gins "${model_type:-${MODEL_TYPE:-t5xl}}" "$@" 2>&1)" || status=$?
  if [ "$status" -ne 0 ]; then
    echo "$(basename "$0"): $out" >&2
    exit 2
  fi
  echo "$out"
}

# Every dataset registry there is, one per family for the model type (the rule is colm/datasets/families.py);
# objects are built only when a scope is named, so this costs little. The user's own registries come through
# -extra_gin_files (load_extra_gin_files below).
dataset_registries() {
  "$PYTHON_EXEC" -m colm.datasets.families "${model_type:-${MODEL_TYPE:-t5xl}}"
}

# -extra_gin_files "a.gin b.gin" (every launcher): the user's own gin files, e.g. the `D/<SCOPE>/TRAIN|EVAL`
# scopes of their tasks. Launchers parse them after their own gin files and before any binding, so they can
# add scopes and override the launcher's files while -extra_bindings still win. Sets the array `extra_gin`
# (paths separated by spaces, relative to the repository root); a missing file is an error.
load_extra_gin_files() {
  extra_gin=()
  read -r -a extra_gin <<< "${extra_gin_files:-}"
  local file
  for file in "${extra_gin[@]}"; do
    if [ ! -f "$file" ]; then
      echo "$(basename "$0"): -extra_gin_files: no file '$file' (paths are relative to the repository root $COLM_ROOT)." >&2
      exit 2
    fi
  done
}

# Runs colm.main and forwards SIGTERM / SIGINT / SIGHUP sent to the launcher, so that stopping the launcher (a
# scheduler's preemption, kill <pid>) stops the run instead of leaving python writing on as an orphan. Python
# turns the signal into a normal exit (colm/main.py); a re-run of the same command resumes the training.
# COLM_TORCHRUN="--standalone --nproc_per_node=2" (any torchrun flags) runs it data-parallel under torchrun
# (docs/distributed.md); torchrun passes the forwarded signals on to every rank.
# COLM_PRELOADED=<socket> (set by the quickstart and scripts/train_experts.py): the command runs in a fork of a
# Python that has already imported torch and transformers (colm/utils/preloaded.py), the same as a new process.
run_colm() {
  local launcher=("$PYTHON_EXEC")
  [ -n "${COLM_PRELOADED:-}" ] && launcher=("$PYTHON_EXEC" -m colm.utils.preloaded run --)
  # shellcheck disable=SC2206  # the torchrun flags are meant to split into words
  [ -n "${COLM_TORCHRUN:-}" ] && launcher=("$PYTHON_EXEC" -m torch.distributed.run $COLM_TORCHRUN)
  echo "[launcher] EXP_NAME=$EXP_NAME ${launcher[*]} -m colm.main $*" >&2
  "${launcher[@]}" -m colm.main "$@" &
  _colm_child=$!
  trap 'kill -TERM "$_colm_child" 2>/dev/null' TERM
  trap 'kill -INT "$_colm_child" 2>/dev/null' INT
  trap 'kill -HUP "$_colm_child" 2>/dev/null' HUP
  local status=0
  while :; do
    status=0
    wait "$_colm_child" || status=$?
    # wait returns early (status > 128) when a trapped signal arrives; wait again until the child has ended.
    kill -0 "$_colm_child" 2>/dev/null || break
  done
  trap - TERM INT HUP
  return "$status"
}

# run_python scripts/x.py ARGS: a script run by a launcher, through the preloaded Python when there is one.
run_python() {
  if [ -n "${COLM_PRELOADED:-}" ]; then
    "$PYTHON_EXEC" -m colm.utils.preloaded run -- "$@"
  else
    "$PYTHON_EXEC" "$@"
  fi
}

# Router flags shared by the MoE launchers: -score_type, -scaling_scores, -elementwise_affine.
router_bindings() {
  echo "M/MODEL/Router.score_type=\"${score_type:-original}\""
  echo "M/MODEL/Router.scaling_scores=${scaling_scores:-True}"
  echo "M/MODEL/Router.elementwise_affine=${elementwise_affine:-False}"
}
