# Source from the repository root:  source exp_launch/setup_environment_variable.sh
# Sets the project root, PYTHONPATH and the defaults the launchers use, and puts the project's virtual
# environment (.venv/bin) first on PATH when there is one, so that a bare `python` is the project's.
# The Hugging Face cache stays where the user has it (HF_HOME, or the library's default).
_colm_here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export COLM_ROOT="$_colm_here"
export MM_ROOT="$COLM_ROOT"  # the original's name, kept for scripts that read it
case ":${PYTHONPATH:-}:" in
  *":$COLM_ROOT:"*) ;;
  *) export PYTHONPATH="$COLM_ROOT${PYTHONPATH:+:$PYTHONPATH}" ;;
esac
export TOKENIZERS_PARALLELISM=false
# One intra-op thread unless asked otherwise: the embedded model gains nothing from more, a shared 2-core machine
# runs ten times slower with OpenMP threads spinning, and the README's timings and scores are measured with one.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export WANDB_PROJECT="${WANDB_PROJECT:-phatgoose}"
if [ -x "$COLM_ROOT/.venv/bin/python" ] && [ -z "${COLM_NO_VENV:-}" ]; then
  export PYTHON_EXEC="$COLM_ROOT/.venv/bin/python"
  case "$PATH:" in
    "$COLM_ROOT/.venv/bin:"*) ;;
    *) export PATH="$COLM_ROOT/.venv/bin:$PATH" ;;
  esac
else
  if [ -z "${COLM_NO_VENV:-}" ]; then
    echo "[colm] no $COLM_ROOT/.venv yet: run 'bash exp_launch/setup_python_env.sh' to create it" \
      "(or set COLM_NO_VENV=1 to use the python on PATH)." >&2
  fi
  export PYTHON_EXEC="${PYTHON_EXEC:-python}"
fi
unset _colm_here
